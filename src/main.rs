//! The `wa-router` binary: a thin shell over the library.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    wa_router::cli::main()
}
