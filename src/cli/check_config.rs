//! `hoard check-config FILE`: everything a start would refuse about a config, found without
//! starting: the parse and every cross-field rule (`Config::check`), then what needs the
//! files it names (the TLS certificate, key and client CA; the upstream's token, CA and client
//! certificate; the webhook secrets) and the data dir (a regular file there cannot become one). Prints the
//! effective settings (the file over the defaults) and exits 0, or prints one error and
//! exits 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;

#[derive(Args)]
pub struct CheckConfigArgs {
    /// The TOML config file to check (as `hoard serve --config` would read it).
    pub file: PathBuf,
}

pub fn main(args: CheckConfigArgs) -> ExitCode {
    match check(&args.file) {
        Ok(config) => {
            println!("{} is valid; the effective settings:", args.file.display());
            println!("{config:#?}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hoard check-config: {message}");
            ExitCode::from(1)
        }
    }
}

/// The config in `file`, if a server could start with it.
pub fn check(file: &Path) -> Result<Config, String> {
    let config = Config::load(file)?;
    if let Some(tls) = &config.tls {
        crate::tls::Tls::load(tls).map_err(|e| format!("[tls]: {e}"))?;
    }
    if let Some(upstream) = &config.upstream {
        // The channel is only prepared (it connects on first use), inside a runtime as tonic
        // wants; the files it names are read now.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        runtime
            .block_on(async { crate::upstream::Upstream::new(upstream).map(drop) })
            .map_err(|e| e.to_string())?;
    }
    let hooks = &config.hooks;
    for (file, key) in [
        (&hooks.github_secret_file, "hooks.github_secret_file"),
        (&hooks.gitlab_token_file, "hooks.gitlab_token_file"),
    ] {
        if let Some(file) = file {
            crate::hooks::read_secret(file, key)?;
        }
    }
    if config.data_dir.exists() && !config.data_dir.is_dir() {
        return Err(format!(
            "data_dir {} exists and is not a directory",
            config.data_dir.display()
        ));
    }
    Ok(config)
}
