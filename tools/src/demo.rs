pub fn run(_a: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    todo!()
}
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}
