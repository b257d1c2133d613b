//! The `ferry-bench` binary: the same harness as `ferry bench`.

fn main() -> std::process::ExitCode {
    match ferry_bench::main_with_args(std::env::args().collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-bench: error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
