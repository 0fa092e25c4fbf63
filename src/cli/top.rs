//! `hoard top`: a live terminal view of one running server. Every `--interval` (2 s) it asks
//! the Admin service's `Stats` (cheap, the same call as `hoard stats --server`) and shows what
//! changed since the previous reply: calls, errors and bytes per second, p50/p99 latency over
//! the interval (from the two replies' cumulative histograms), used vs max size, evictions, and
//! AC and CAS hit rates per namespace.
//!
//! The poller runs on a tokio task and hands replies to the drawing loop over a channel, so keys
//! are read at once even while a server does not answer. A server that goes away shows an error
//! line and is asked again at the next tick. `q`, Esc and Ctrl-C quit (so do SIGINT, SIGTERM
//! and SIGHUP); the terminal is restored on every way out, panics included (ratatui's hook).
//!
//! Exit status: 0 after quitting; 2 when it could not start (bad flags, stdout not a terminal).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Gauge, Paragraph, Row, Table};
use ratatui::Frame;

use crate::cli::admin::{count, duration, percent, size, DEFAULT_SERVER, EXIT_FAILED};
use crate::client::{self, Connection};
use crate::config::HumanDuration;
use crate::proto::admin::{admin_client::AdminClient, StatsRequest, StatsResponse};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// A running hoard, http://HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS).
    #[arg(long, value_name = "URL", env = "HOARD_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    #[command(flatten)]
    pub connect: client::ConnectOptions,
    /// How often to ask the server and redraw; rates are over this interval (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub interval: HumanDuration,
}

/// Runs the view until the user quits; errors that keep it from starting are printed as one
/// line.
pub fn main(args: TopArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hoard: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// One Stats reply and when it arrived.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    pub stats: StatsResponse,
}

/// What changed between two replies, per second of the time between them.
#[derive(Clone, Debug, PartialEq)]
pub struct Rates {
    pub secs: f64,
    pub requests: f64,
    pub errors: f64,
    /// `None` while the server does not count bytes.
    pub bytes_received: Option<f64>,
    pub bytes_sent: Option<f64>,
    pub evicted_blobs: f64,
    /// Latency quantiles over the interval, in seconds; `None` without calls in it.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl Rates {
    /// `None` if no time passed, or if the server restarted in between (its counters began
    /// again, so a difference would mean nothing).
    pub fn between(prev: &Snapshot, cur: &Snapshot) -> Option<Rates> {
        let secs = cur.at.checked_duration_since(prev.at)?.as_secs_f64();
        let (p, c) = (&prev.stats, &cur.stats);
        if secs <= 0.0 || c.uptime_secs < p.uptime_secs || c.requests < p.requests {
            return None;
        }
        let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let bytes = |a: Option<u64>, b: Option<u64>| Some(per_sec(a?, b?));
        Some(Rates {
            secs,
            requests: per_sec(p.requests, c.requests),
            errors: per_sec(p.request_errors, c.request_errors),
            bytes_received: bytes(p.bytes_received, c.bytes_received),
            bytes_sent: bytes(p.bytes_sent, c.bytes_sent),
            evicted_blobs: per_sec(p.evicted_blobs, c.evicted_blobs),
            p50: quantile(
                &c.latency_bounds_secs,
                &p.latency_cumulative,
                &c.latency_cumulative,
                0.5,
            ),
            p99: quantile(
                &c.latency_bounds_secs,
                &p.latency_cumulative,
                &c.latency_cumulative,
                0.99,
            ),
        })
    }
}

/// The `q` quantile of the calls between two cumulative histograms (`bounds.len() + 1` counts,
/// the last +Inf), interpolated linearly within its bucket as Prometheus' `histogram_quantile`
/// does; a quantile in the +Inf bucket is reported as the largest bound. `None` without calls
/// in between or with histograms of another shape.
pub fn quantile(bounds: &[f64], prev: &[u64], cur: &[u64], q: f64) -> Option<f64> {
    if bounds.is_empty() || cur.len() != bounds.len() + 1 || prev.len() != cur.len() {
        return None;
    }
    let delta: Vec<u64> = cur
        .iter()
        .zip(prev)
        .map(|(c, p)| c.saturating_sub(*p))
        .collect();
    let total = *delta.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = delta.iter().position(|n| *n as f64 >= rank)?;
    let Some(&upper) = bounds.get(i) else {
        return bounds.last().copied();
    };
    let (lower, below) = match i {
        0 => (0.0, 0),
        _ => (bounds[i - 1], delta[i - 1]),
    };
    let inside = delta[i].saturating_sub(below);
    let fraction = if inside == 0 {
        1.0
    } else {
        (rank - below as f64) / inside as f64
    };
    Some(lower + (upper - lower) * fraction)
}

/// One namespace's line of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceRow {
    pub namespace: String,
    /// Lookups per second over the interval (`None` before there are two replies).
    pub ac_per_sec: Option<f64>,
    /// Hit rates in percent over the interval (`None` without lookups in it) and since start.
    pub ac_hits: Option<f64>,
    pub ac_hits_total: Option<f64>,
    pub cas_per_sec: Option<f64>,
    pub cas_found: Option<f64>,
    pub cas_found_total: Option<f64>,
    /// AC and CAS lookups since start: what the table is sorted by.
    pub lookups: u64,
}

/// The table's rows, busiest namespace (most lookups since start) first. A namespace missing
/// from `prev` counts from zero there (it was first seen in between).
pub fn namespace_rows(prev: Option<&Snapshot>, cur: &Snapshot) -> Vec<NamespaceRow> {
    let secs = prev
        .and_then(|p| cur.at.checked_duration_since(p.at))
        .map(|d| d.as_secs_f64())
        .filter(|s| *s > 0.0);
    let rate = |hits: u64, total: u64| (total > 0).then(|| hits as f64 * 100.0 / total as f64);
    let mut rows: Vec<NamespaceRow> = cur
        .stats
        .namespaces
        .iter()
        .map(|n| {
            let before = prev
                .and_then(|p| {
                    p.stats
                        .namespaces
                        .iter()
                        .find(|o| o.namespace == n.namespace)
                })
                .cloned()
                .unwrap_or_default();
            let d = |now: u64, then: u64| now.saturating_sub(then);
            let (ac, ac_hit) = (
                d(n.ac_lookups, before.ac_lookups),
                d(n.ac_hits, before.ac_hits),
            );
            let (cas, cas_found) = (
                d(n.cas_lookups, before.cas_lookups),
                d(n.cas_found, before.cas_found),
            );
            NamespaceRow {
                namespace: n.namespace.clone(),
                ac_per_sec: secs.map(|s| ac as f64 / s),
                ac_hits: secs.and(rate(ac_hit, ac)),
                ac_hits_total: rate(n.ac_hits, n.ac_lookups),
                cas_per_sec: secs.map(|s| cas as f64 / s),
                cas_found: secs.and(rate(cas_found, cas)),
                cas_found_total: rate(n.cas_found, n.cas_lookups),
                lookups: n.ac_lookups + n.cas_lookups,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.lookups
            .cmp(&a.lookups)
            .then_with(|| a.namespace.cmp(&b.namespace))
    });
    rows
}

/// What the screen shows: the last two replies, and the last failure if the latest poll
/// failed.
pub struct View {
    pub server: String,
    pub interval: Duration,
    pub prev: Option<Snapshot>,
    pub cur: Option<Snapshot>,
    pub error: Option<String>,
}

impl View {
    pub fn new(server: String, interval: Duration) -> View {
        View {
            server,
            interval,
            prev: None,
            cur: None,
            error: None,
        }
    }

    pub fn update(&mut self, reply: Result<StatsResponse, String>, at: Instant) {
        match reply {
            Ok(stats) => {
                self.prev = self.cur.take();
                self.cur = Some(Snapshot { at, stats });
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }
}

/// Draws `view` on the whole frame.
pub fn draw(frame: &mut Frame, view: &View) {
    let [title, gauge, storage, rates_area, error, table] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(frame.area());
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let interval = format!("{:.1}s", view.interval.as_secs_f64());
    let Some(cur) = &view.cur else {
        frame.render_widget(
            Paragraph::new(format!("hoard top  {}  connecting… (q quits)", view.server))
                .style(bold),
            title,
        );
        if let Some(e) = &view.error {
            frame.render_widget(error_line(e, &interval), error);
        }
        return;
    };
    let s = &cur.stats;
    frame.render_widget(
        Paragraph::new(format!(
            "hoard top  {}  hoard {}, up {}  every {interval}  (q quits)",
            view.server,
            if s.server_version.is_empty() {
                "?"
            } else {
                &s.server_version
            },
            duration(s.uptime_secs),
        ))
        .style(bold),
        title,
    );
    let (ratio, label) = if s.max_size > 0 {
        (
            (s.used_bytes as f64 / s.max_size as f64).clamp(0.0, 1.0),
            format!(
                "used {} of {} max ({})",
                size(s.used_bytes),
                size(s.max_size),
                percent(s.used_bytes, s.max_size)
            ),
        )
    } else {
        (0.0, format!("used {} (no max)", size(s.used_bytes)))
    };
    frame.render_widget(
        Gauge::default()
            .ratio(ratio)
            .label(label)
            .gauge_style(Style::default().fg(Color::Green).bg(Color::DarkGray)),
        gauge,
    );
    let rates = view
        .prev
        .as_ref()
        .and_then(|prev| Rates::between(prev, cur));
    let mut evicted = format!(
        "evicted {} blobs ({}) since start",
        count(s.evicted_blobs),
        size(s.evicted_bytes)
    );
    if let Some(r) = &rates {
        evicted += &format!(", {}/s", per_sec(r.evicted_blobs));
    }
    if let Some(age) = s.youngest_evicted_age_secs {
        evicted += &format!("; youngest evicted idle {}", duration(age));
    }
    evicted += &format!(
        "; {} blobs, {} action results; refused writes {}",
        count(s.blobs),
        count(s.action_results),
        count(s.refused_writes)
    );
    frame.render_widget(Paragraph::new(evicted), storage);
    let rates_text = match &rates {
        Some(r) => format!(
            "requests {}/s  errors {}/s  bytes/s in {} out {}  p50 {}  p99 {}  (last {:.1}s)",
            per_sec(r.requests),
            per_sec(r.errors),
            bytes_per_sec(r.bytes_received),
            bytes_per_sec(r.bytes_sent),
            latency(r.p50),
            latency(r.p99),
            r.secs
        ),
        None => format!(
            "requests {} since start, {} failed  (rates after the next reply)",
            count(s.requests),
            count(s.request_errors)
        ),
    };
    frame.render_widget(Paragraph::new(rates_text), rates_area);
    if let Some(e) = &view.error {
        frame.render_widget(error_line(e, &interval), error);
    }
    let header = Row::new([
        "namespace",
        "AC/s",
        "AC hit",
        "AC hit total",
        "CAS/s",
        "CAS found",
        "CAS found total",
    ])
    .style(bold);
    let pct = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.1}%"));
    let rate = |r: Option<f64>| r.map_or("-".to_string(), per_sec);
    let rows: Vec<Row> = namespace_rows(view.prev.as_ref(), cur)
        .into_iter()
        .map(|r| {
            Row::new([
                shown_name(&r.namespace),
                rate(r.ac_per_sec),
                pct(r.ac_hits),
                pct(r.ac_hits_total),
                rate(r.cas_per_sec),
                pct(r.cas_found),
                pct(r.cas_found_total),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let widths = [
        Constraint::Min(20),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(13),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(16),
    ];
    if empty {
        frame.render_widget(
            Paragraph::new("no AC or CAS lookups since the server started"),
            table,
        );
    } else {
        frame.render_widget(Table::new(rows, widths).header(header), table);
    }
}

fn error_line(e: &str, interval: &str) -> Paragraph<'static> {
    Paragraph::new(Line::from(format!(
        "error: {e} (asking again every {interval}; figures above are from the last reply)"
    )))
    .style(Style::default().fg(Color::Red).add_modifier(Modifier::BOLD))
}

/// The default instance is the empty name; shown as `""` so its row is not blank.
fn shown_name(name: &str) -> String {
    if name.is_empty() {
        "\"\"".into()
    } else {
        name.to_string()
    }
}

fn per_sec(r: f64) -> String {
    match r {
        r if r >= 10_000.0 => format!("{:.1}k", r / 1000.0),
        r => format!("{r:.1}"),
    }
}

fn bytes_per_sec(r: Option<f64>) -> String {
    match r {
        Some(r) => size(r as u64),
        // The server does not count bytes (yet): say so rather than show 0.
        None => "n/a".into(),
    }
}

fn latency(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1e3),
        Some(s) => format!("{s:.2} s"),
    }
}

/// What the background tasks tell the drawing loop.
enum Message {
    Stats(Box<Result<StatsResponse, String>>, Instant),
    Quit,
}

/// Restores the terminal when dropped, on every way out of [`run`] after it was set up.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn run(args: TopArgs) -> Result<(), String> {
    let interval = args.interval.0;
    if interval < Duration::from_millis(100) {
        return Err(format!(
            "--interval {interval:?} is too short; give at least 100ms"
        ));
    }
    // Usage errors (a bad address or TLS file) before the terminal changes.
    let server = client::Server::parse_with(&args.server, &args.connect)?;
    if !std::io::stdout().is_terminal() {
        return Err(
            "hoard top draws on a terminal, and stdout is not one; for figures in a script use \
             hoard stats --json"
                .into(),
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let mut view = View::new(server.uri().to_string(), interval);
    runtime.spawn(poll(server, interval, tx.clone()));
    runtime.spawn(quit_on_signal(tx));
    let mut terminal =
        ratatui::try_init().map_err(|e| format!("cannot set up the terminal: {e}"))?;
    let restore = Restore;
    let result = ui_loop(&mut terminal, &mut view, &rx);
    drop(restore);
    runtime.shutdown_background();
    result
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    view: &mut View,
    rx: &mpsc::Receiver<Message>,
) -> Result<(), String> {
    let failed = |e: std::io::Error| format!("terminal: {e}");
    loop {
        terminal.draw(|frame| draw(frame, view)).map_err(failed)?;
        // Short waits, so a reply is drawn soon after it arrives; ratatui only sends changes.
        if event::poll(Duration::from_millis(100)).map_err(failed)? {
            if let Event::Key(key) = event::read().map_err(failed)? {
                if is_quit(&key) {
                    return Ok(());
                }
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Message::Stats(reply, at)) => view.update(*reply, at),
                Ok(Message::Quit) => return Ok(()),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err("the poller stopped unexpectedly".into())
                }
            }
        }
    }
}

/// `q`, Esc, or Ctrl-C (raw mode turns Ctrl-C into a key instead of SIGINT).
fn is_quit(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q') | KeyCode::Esc => true,
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// Asks for Stats every `interval` until the drawing loop is gone. The connection is opened on
/// first use and again after a failure, so a restarted server is picked up.
async fn poll(server: client::Server, interval: Duration, tx: mpsc::Sender<Message>) {
    let mut admin: Option<AdminClient<Connection>> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let reply = fetch(&server, &mut admin, interval).await;
        if reply.is_err() {
            admin = None;
        }
        if tx
            .send(Message::Stats(Box::new(reply), Instant::now()))
            .is_err()
        {
            return;
        }
    }
}

async fn fetch(
    server: &client::Server,
    admin: &mut Option<AdminClient<Connection>>,
    interval: Duration,
) -> Result<StatsResponse, String> {
    let client = match admin {
        Some(client) => client,
        None => admin.insert(AdminClient::new(server.connect().await?)),
    };
    let wait = interval.max(Duration::from_secs(5));
    match tokio::time::timeout(wait, client.stats(StatsRequest {})).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => Err(format!(
            "the server at {} does not serve hoard.admin.v1.Admin (an older hoard, or not hoard)",
            server.uri()
        )),
        Ok(Err(status)) => Err(format!(
            "Stats failed: {:?}: {}",
            status.code(),
            client::status_text(&status)
        )),
        Err(_) => Err(format!("no reply to Stats within {}s", wait.as_secs())),
    }
}

/// SIGINT, SIGTERM or SIGHUP from outside (raw mode keeps Ctrl-C from being one) quit like `q`,
/// so the terminal is restored instead of left in raw mode.
async fn quit_on_signal(tx: mpsc::Sender<Message>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {},
        _ = term.recv() => {},
        _ = hup.recv() => {},
    }
    let _ = tx.send(Message::Quit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::admin::NamespaceStats;

    const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

    fn snapshot(at: Instant, stats: StatsResponse) -> Snapshot {
        Snapshot { at, stats }
    }

    fn ns(name: &str, ac: (u64, u64), cas: (u64, u64)) -> NamespaceStats {
        NamespaceStats {
            namespace: name.into(),
            ac_lookups: ac.0,
            ac_hits: ac.1,
            cas_lookups: cas.0,
            cas_found: cas.1,
        }
    }

    #[test]
    fn quantiles_come_from_the_interval_only() {
        // Before: 100 fast calls. In between: 10 more, 5 under 1 ms, 4 up to 10 ms, 1 up to
        // 100 ms.
        let prev = [100, 100, 100, 100];
        let cur = [105, 109, 110, 110];
        // p50: rank 5 of 10, the end of the first bucket.
        assert_eq!(quantile(&BOUNDS, &prev, &cur, 0.5), Some(0.001));
        // p99: rank 9.9, 90% into the third bucket (0.01..0.1).
        let p99 = quantile(&BOUNDS, &prev, &cur, 0.99).unwrap();
        assert!((p99 - 0.091).abs() < 1e-9, "{p99}");
        // Nothing happened in between: no quantile, not the old calls'.
        assert_eq!(quantile(&BOUNDS, &cur, &cur, 0.5), None);
        // Beyond the last bound: reported as the last bound.
        assert_eq!(quantile(&BOUNDS, &[0; 4], &[0, 0, 0, 3], 0.5), Some(0.1));
        // Another shape (a server of another version): no answer rather than a wrong one.
        assert_eq!(quantile(&BOUNDS, &[0; 3], &[1; 4], 0.5), None);
    }

    #[test]
    fn rates_are_per_second_and_stop_at_a_restart() {
        let t0 = Instant::now();
        let prev = StatsResponse {
            requests: 100,
            request_errors: 1,
            evicted_blobs: 10,
            uptime_secs: 60,
            latency_bounds_secs: BOUNDS.to_vec(),
            latency_cumulative: vec![100, 100, 100, 100],
            ..Default::default()
        };
        let cur = StatsResponse {
            requests: 110,
            request_errors: 5,
            evicted_blobs: 14,
            uptime_secs: 62,
            latency_cumulative: vec![105, 109, 110, 110],
            ..prev.clone()
        };
        let r = Rates::between(
            &snapshot(t0, prev.clone()),
            &snapshot(t0 + Duration::from_secs(2), cur.clone()),
        )
        .unwrap();
        assert_eq!(r.requests, 5.0);
        assert_eq!(r.errors, 2.0);
        assert_eq!(r.evicted_blobs, 2.0);
        assert_eq!(r.bytes_received, None, "no byte counts: n/a, not 0");
        assert_eq!(r.p50, Some(0.001));
        assert_eq!(latency(r.p50), "1.0 ms");
        assert_eq!(bytes_per_sec(r.bytes_sent), "n/a");
        let restarted = StatsResponse {
            uptime_secs: 1,
            requests: 3,
            ..cur
        };
        assert_eq!(
            Rates::between(
                &snapshot(t0, prev),
                &snapshot(t0 + Duration::from_secs(2), restarted)
            ),
            None
        );
    }

    #[test]
    fn rows_have_interval_and_total_rates_busiest_first() {
        let t0 = Instant::now();
        let prev = snapshot(
            t0,
            StatsResponse {
                namespaces: vec![ns("ci/main", (10, 5), (0, 0))],
                ..Default::default()
            },
        );
        let cur = snapshot(
            t0 + Duration::from_secs(2),
            StatsResponse {
                namespaces: vec![
                    ns("ci/main", (14, 8), (0, 0)),
                    ns("dev", (100, 90), (50, 25)),
                ],
                ..Default::default()
            },
        );
        let rows = namespace_rows(Some(&prev), &cur);
        assert_eq!(rows[0].namespace, "dev");
        assert_eq!(
            rows[0].ac_per_sec,
            Some(50.0),
            "new since prev: counts from 0"
        );
        assert_eq!(rows[0].cas_found_total, Some(50.0));
        assert_eq!(rows[1].namespace, "ci/main");
        assert_eq!(rows[1].ac_per_sec, Some(2.0));
        assert_eq!(rows[1].ac_hits, Some(75.0));
        assert_eq!(rows[1].ac_hits_total, Some(8.0 * 100.0 / 14.0));
        assert_eq!(rows[1].cas_found, None, "no CAS lookups: no rate");
        // With one reply only, totals but no interval figures.
        let first = namespace_rows(None, &cur);
        assert_eq!(first[0].ac_per_sec, None);
        assert_eq!(first[0].ac_hits, None);
        assert_eq!(first[0].ac_hits_total, Some(90.0));
    }

    /// The whole screen, drawn on ratatui's test backend, as lines of text.
    fn screen(view: &View) -> String {
        let mut terminal = ratatui::Terminal::new(ratatui::backend::TestBackend::new(120, 20))
            .expect("test terminal");
        terminal.draw(|f| draw(f, view)).expect("draw");
        let buffer = terminal.backend().buffer();
        let width = buffer.area.width as usize;
        buffer
            .content
            .chunks(width)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_screen_shows_namespaces_rates_and_errors() {
        let t0 = Instant::now();
        let mut view = View::new("http://127.0.0.1:9092".into(), Duration::from_secs(2));
        let stats = StatsResponse {
            used_bytes: 3 << 30,
            max_size: 10 << 30,
            server_version: "0.1.0".into(),
            uptime_secs: 90,
            namespaces: vec![ns("team/a", (4, 3), (10, 10)), ns("", (1, 0), (0, 0))],
            ..Default::default()
        };
        assert!(screen(&view).contains("connecting"));
        view.update(Ok(stats.clone()), t0);
        let text = screen(&view);
        assert!(text.contains("hoard 0.1.0, up 1m 30s"), "{text}");
        assert!(
            text.contains("used 3.0 GiB of 10.0 GiB max (30.0%)"),
            "{text}"
        );
        assert!(text.contains("rates after the next reply"), "{text}");
        let team = text
            .lines()
            .find(|l| l.contains("team/a"))
            .expect("a team/a row");
        assert!(team.contains("75.0%") && team.contains("100.0%"), "{team}");
        assert!(
            text.contains("\"\""),
            "the default instance has a row: {text}"
        );
        view.update(Ok(stats), t0 + Duration::from_secs(2));
        let text = screen(&view);
        assert!(text.contains("requests 0.0/s"), "{text}");
        assert!(text.contains("bytes/s in n/a out n/a"), "{text}");
        view.update(Err("cannot connect to http://127.0.0.1:9092".into()), t0);
        let text = screen(&view);
        assert!(text.contains("error: cannot connect"), "{text}");
        assert!(text.contains("team/a"), "the last figures stay: {text}");
    }

    #[test]
    fn q_esc_and_ctrl_c_quit() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
    }
}
