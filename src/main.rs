fn main() -> std::process::ExitCode {
    kiln::process::configure_process();
    kiln::cli::main()
}
