//! The `wa-router` binary: a thin shell over the library.

fn main() -> std::process::ExitCode {
    wa_router::cli::main()
}
