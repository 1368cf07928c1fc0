//! The `wa-router` binary: a thin shell over the library.

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    wa_router::cli::main()
}
