//! `vstream docs --out DIR`: the man pages (one per command and subcommand,
//! from the same clap definitions as `--help`) and the shell completions
//! that the package installs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Command};

#[derive(Debug, Args)]
pub struct DocsArgs {
    /// Write DIR/man/*.1 and DIR/completions/{vstream.bash,_vstream,vstream.fish}.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: DocsArgs, cmd: Command) -> Result<()> {
    let man = args.out.join("man");
    let completions = args.out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    }
    let mut cmd = cmd;
    cmd.build();
    let pages = write_pages(&man, &cmd, "vstream")?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "vstream.bash"),
        (clap_complete::Shell::Zsh, "_vstream"),
        (clap_complete::Shell::Fish, "vstream.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "vstream", &mut out);
        let path = completions.join(file);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "wrote {pages} man pages to {} and 3 completions to {}",
        man.display(),
        completions.display()
    );
    Ok(())
}

/// Writes `cmd`'s page as NAME.1, then its subcommands' as NAME-SUB.1.
fn write_pages(dir: &Path, cmd: &Command, name: &str) -> Result<usize> {
    let page = cmd
        .clone()
        .display_name(name.to_owned())
        .bin_name(name.replace('-', " "));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        n += write_pages(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(n)
}
