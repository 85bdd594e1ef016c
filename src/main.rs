use std::process::ExitCode;

fn main() -> ExitCode {
    voipc::cli::main()
}
