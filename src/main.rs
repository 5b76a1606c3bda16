fn main() -> std::process::ExitCode {
    kiln::model::configure_process();
    kiln::cli::main()
}
