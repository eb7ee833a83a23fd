//! envrender's entry point: parse the command line, run the command on a
//! single-threaded runtime, map the outcome to the documented exit code.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;
use envrender::cli::Cli;
use envrender::environment::ProcessEnv;

fn main() -> ExitCode {
    // clap exits with 2 on usage errors, as the CLI contract requires.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(envrender::app::run(cli, Arc::new(ProcessEnv))) {
        // `run`: the app's own code; it has said what it had to say.
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
