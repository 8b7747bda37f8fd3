//! Output: the progress bar (or plain progress lines off a terminal), JSON lines, and the
//! text and JSON forms of reports and events.

use std::sync::Arc;

use anyhow::Result;

use crate::boot::slot_ops::SlotChange;
use crate::fetch::http::{EventSink, FetchEvent, FetchSummary};
use crate::install::{InstallEvent, InstallReport};

/// Progress display: a bar on a terminal, plain lines otherwise, nothing with --json.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain_next: u64,
    pub label: String,
    quiet: bool,
}

impl Progress {
    pub fn new(label: &str, quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        Self {
            bar,
            plain_next: 0,
            label: label.to_string(),
            quiet,
        }
    }

    pub fn set_label(&mut self, label: &str) {
        self.label = label.to_string();
        self.plain_next = 0;
        if let Some(bar) = &self.bar {
            bar.set_message(label.to_string());
            bar.set_position(0);
        }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
        } else if done >= self.plain_next || done == total {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            eprintln!("{}: {} / {} bytes ({pct}%)", self.label, done, total);
            self.plain_next = done + total / 10;
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Shows install events: progress (a new display per install attempt) and messages, or JSON
/// lines with --json.
pub struct InstallDisplay {
    json: bool,
    progress: Option<Progress>,
}

impl InstallDisplay {
    /// A display; `json` for JSON lines.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            progress: None,
        }
    }

    /// Shows one event.
    pub fn show(&mut self, event: InstallEvent) {
        let json = self.json;
        let progress = self
            .progress
            .get_or_insert_with(|| Progress::new("writing", json));
        show_install_event(event, json, progress);
    }

    /// Ends the current attempt's progress display.
    pub fn finish(&mut self) {
        if let Some(progress) = self.progress.take() {
            progress.finish();
        }
    }
}

/// Prints one JSON line on stdout.
pub fn json_line(value: &impl serde::Serialize) {
    if let Ok(line) = serde_json::to_string(value) {
        println!("{line}");
    }
}

/// Download events: JSON lines on stdout with --json, else retries and resumes on stderr.
pub fn fetch_sink(json: bool) -> EventSink {
    Arc::new(move |event: &FetchEvent| {
        if json {
            json_line(event);
        } else if !matches!(event, FetchEvent::FetchConnected { offset: 0, .. }) {
            eprintln!("fetch: {event}");
        }
    })
}

/// An install event: a JSON line with --json, else a message or progress on stderr.
fn show_install_event(event: InstallEvent, json: bool, progress: &mut Progress) {
    use InstallEvent as E;
    if json {
        json_line(&event);
        return;
    }
    match &event {
        E::Verified {
            version,
            compatible,
            image_size,
            key_id,
        } => {
            eprintln!("signature ok (key {key_id}): version {version}, compatible {compatible}, {image_size} bytes")
        }
        E::Plan {
            running,
            running_source,
            target,
        } => eprintln!("running slot {running} (from {running_source}); target {target}"),
        E::AdaptivePlan {
            running,
            bytes_hashed,
            index_seconds,
            summary,
        } => eprintln!(
            "adaptive: hashed {} MiB of {running} in {index_seconds:.2} s; {} of {} chunks ({} MiB) found there, {} MiB of the bundle's payload still to read, {} MiB skipped",
            bytes_hashed >> 20,
            summary.reused_chunks,
            summary.chunks,
            summary.reused_bytes >> 20,
            mib(summary.bundle_bytes),
            mib(summary.skipped_bundle_bytes),
        ),
        E::TargetInvalidated {
            target,
            path,
            direct_io,
        } => eprintln!(
            "{target} marked unbootable; writing via {path}{}",
            if *direct_io { " (O_DIRECT)" } else { "" }
        ),
        E::Written { bytes, total } => progress.update(*bytes, *total),
        E::ReadBack { bytes, total } => {
            if progress.label != "verifying" {
                progress.set_label("verifying");
            }
            progress.update(*bytes, *total)
        }
        E::ReadbackVerified { sha256 } => {
            progress.finish();
            eprintln!("read-back matches signed hash {sha256}");
        }
        E::KernelPart { partition, size } => {
            eprintln!("writing the kernel ({size} bytes) into {partition}");
            progress.set_label("writing");
        }
        E::Activated { slot, attributes } => eprintln!("{slot} boots next: {attributes}"),
    }
}

/// The final report of an install: a `done` JSON line, or text.
pub fn print_installed(report: &InstallReport, fetch: Option<FetchSummary>, json: bool) {
    if json {
        let action = if report.dry_run {
            "dry-run"
        } else {
            "installed"
        };
        json_line(
            &serde_json::json!({"event": "done", "action": action, "report": report, "fetch": fetch}),
        );
        return;
    }
    if report.dry_run {
        println!(
            "dry run: {} ({} bytes) would be installed into {} (running {}); every check passed, nothing was written",
            report.version, report.image_size, report.target, report.running
        );
        if let Some(a) = report.adaptive {
            println!(
                "adaptive: {} of {} chunks ({} bytes) would be copied from {}; {} bytes of the bundle's payload would be read, {} skipped",
                a.planned.reused_chunks,
                a.planned.chunks,
                a.planned.reused_bytes,
                report.running,
                a.planned.bundle_bytes,
                a.planned.skipped_bundle_bytes
            );
        }
        return;
    }
    println!(
        "installed {} into {} ({} bytes in {:.2} s: write {:.2} s, flush + verify {:.2} s); reboot to try it",
        report.version, report.target, report.image_size, report.total_seconds, report.write_seconds, report.verify_seconds
    );
    if let Some(a) = report.adaptive {
        println!(
            "adaptive: {} of {} chunks copied from {} ({} bytes), {} fell back to the bundle",
            a.planned.reused_chunks - a.fallbacks,
            a.planned.chunks,
            report.running,
            a.planned.reused_bytes,
            a.fallbacks
        );
    }
    if let Some(f) = fetch {
        println!(
            "fetched {} bytes in {} requests: {} retries, {} responses ignored Range ({} bytes re-sent), {} bytes skipped",
            f.bytes, f.requests, f.retries, f.range_ignored, f.discarded, f.skipped
        );
    }
}

/// Bytes as MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// A slot change of mark-good, mark-bad, rollback or commit.
pub fn print_change(change: &SlotChange, verb: &str, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(change)?);
    } else if change.bytes_written == 0 {
        println!(
            "{}: {} already {} ({}); nothing written",
            verb, change.slot, change.after, verb
        );
    } else {
        println!(
            "{}: {} {} -> {}",
            verb, change.slot, change.before, change.after
        );
    }
    Ok(())
}
