//! `hoard provenance`: who wrote the action result an instance would be served, when, and
//! through which instance name, over the Admin service (`GetProvenance`). For the audit after a
//! poisoned entry is found: name the writer, then invalidate.
//!
//! Exit status: 0 when a result is visible (its provenance printed), 1 when none is (the reason
//! on stderr), 2 when the command could not run (bad flags, no server, a refused request).

use std::process::ExitCode;

use clap::Args;

use crate::cli::admin::EXIT_FAILED;
use crate::cli::invalidate::{connect, one_line, parse_action, shown, Server};
use crate::digest::Digest;
use crate::proto::admin::{GetProvenanceRequest, GetProvenanceResponse};

/// Exit status when the instance would be served no result for the action.
pub const EXIT_NOT_FOUND: u8 = 1;

#[derive(Debug, Args)]
pub struct ProvenanceArgs {
    /// The instance name the build asks with ("" is the default instance); its read chain is
    /// searched as GetActionResult would.
    #[arg(long, value_name = "NAME")]
    pub instance: String,
    /// The action digest, HASH/SIZE.
    #[arg(value_name = "HASH/SIZE", value_parser = parse_action)]
    pub action: Digest,
    #[command(flatten)]
    pub server: Server,
}

/// Runs the command and returns the exit status; errors are printed as one line.
pub fn main(args: ProvenanceArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Stop(EXIT_FAILED, format!("cannot start the async runtime: {e}")))
        .and_then(|runtime| runtime.block_on(run(&args)));
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(Stop(code, message)) => {
            eprintln!("hoard: {message}");
            ExitCode::from(code)
        }
    }
}

/// Why the command ends without printing provenance: the exit status and the message.
struct Stop(u8, String);

async fn run(args: &ProvenanceArgs) -> Result<String, Stop> {
    let failed = |message| Stop(EXIT_FAILED, message);
    let (uri, mut client) = connect(&args.server).await.map_err(failed)?;
    let request = GetProvenanceRequest {
        instance_name: args.instance.clone(),
        action_digest: Some(args.action.to_proto()),
    };
    let reply = match client.get_provenance(request).await {
        Ok(reply) => reply.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            return Err(Stop(EXIT_NOT_FOUND, s.message().to_string()))
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            return Err(failed(format!(
                "provenance: the server at {uri} does not serve provenance (an older hoard, \
                 or not hoard)"
            )))
        }
        Err(s) => {
            return Err(failed(format!(
                "provenance failed on {uri}: {:?}: {}",
                s.code(),
                s.message()
            )))
        }
    };
    if args.server.json {
        super::json(&reply).map_err(failed)
    } else {
        Ok(render(&reply))
    }
}

fn render(p: &GetProvenanceResponse) -> String {
    format!(
        "writer:    {}\nnamespace: {}\nepoch:     {}\ninstance:  {}\nstored at: {}",
        one_line(&p.writer),
        shown(&p.namespace),
        p.epoch,
        shown(&p.instance_name),
        utc(p.stored_at_unix_secs)
    )
}

/// Unix seconds as `2024-05-01 12:00:00 UTC`: the proleptic Gregorian calendar, counted from
/// days since 1970-01-01 in 400-year eras (146097 days each). No date crate for one line.
fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rest / 3600, rest % 3600 / 60, rest % 60);
    // Days since 0000-03-01, so that a leap day falls at the end of a (March-based) year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_709_210_096), "2024-02-29 12:34:56 UTC");
        assert_eq!(utc(1_735_689_599), "2024-12-31 23:59:59 UTC");
        assert_eq!(utc(4_107_542_400), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn provenance_prints_one_field_a_line() {
        let reply = GetProvenanceResponse {
            namespace: "ci/main".into(),
            epoch: 2,
            writer: "ci-bot\n".into(),
            instance_name: String::new(),
            stored_at_unix_secs: 0,
        };
        assert_eq!(
            render(&reply),
            "writer:    ci-bot\\n\nnamespace: ci/main\nepoch:     2\ninstance:  \"\"\n\
             stored at: 1970-01-01 00:00:00 UTC"
        );
        assert_eq!(
            crate::cli::json(&reply).unwrap(),
            r#"{"epoch":2,"instance_name":"","namespace":"ci/main","stored_at_unix_secs":0,"writer":"ci-bot\n"}"#
        );
    }
}
