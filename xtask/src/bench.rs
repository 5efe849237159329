pub fn bench(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench: todo")
}
