pub fn demo() -> anyhow::Result<()> {
    anyhow::bail!("demo: todo")
}
