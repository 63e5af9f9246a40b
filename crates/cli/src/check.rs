//! `courier check`: an application's manifest, checked; one line per
//! problem.

pub(crate) fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let (manifest, _) = courier_server::load_manifest(path).map_err(|e| anyhow::anyhow!(e))?;
    let problems = courier_manifest::check(&manifest);
    let origin = path.display().to_string();
    for p in &problems {
        println!("{}", p.display_in(&origin));
    }
    if courier_manifest::has_errors(&problems) {
        anyhow::bail!(
            "{origin}: {} problem(s); fix the errors above",
            problems.len()
        );
    }
    eprintln!(
        "courier: {origin} is consistent ({} warning(s))",
        problems.len()
    );
    Ok(())
}
