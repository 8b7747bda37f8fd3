//! `abupdate service`: the D-Bus interface `io.abupdate.Updater1` at `/io/abupdate/Updater1`,
//! for the programs that drive updates (UIs, fleet agents, reboot coordinators).
//!
//! Why a service and not only the CLI: the peers' users drive updates over D-Bus (RAUC's
//! `de.pengutronix.rauc.Installer`, Flatcar's `com.coreos.update1`), and a watcher wants
//! byte-level progress and the outcome as signals, not by parsing a child's output.
//!
//! Nothing here is a second implementation: an install is
//! [`crate::fetch::update::install_from`], the function the CLI runs, on a worker thread; its
//! [`InstallEvent`]s become the `Progress` property and the rate-limited `ProgressUpdate`
//! signal; slot operations are [`crate::boot::slot_ops`]; errors carry the CLI's exit codes
//! ([`crate::exit`]). One operation at a time (a second call gets
//! `io.abupdate.Updater1.Error.Busy`), and the disk lock still excludes the CLI.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;

use crate::disk::slots::DiskSpec;
use crate::fetch::http::FetchOptions;
use crate::fetch::update::{ChannelRequest, UpdateEvent, UpdateSettings};
use crate::install::{InstallEvent, InstallOptions};

/// The well-known bus name, which is also the interface name.
pub const BUS_NAME: &str = "io.abupdate.Updater1";
/// The object path.
pub const OBJECT_PATH: &str = "/io/abupdate/Updater1";
/// At most this many `ProgressUpdate` signals per second (phase changes always go out).
const SIGNALS_PER_SECOND: u32 = 10;

/// What the service works on: the same settings as the CLI.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The disk.
    pub disk: DiskSpec,
    /// Trusted keys.
    pub keyring: PathBuf,
    /// Defaults for installs (tries, compatible, sentinel, ...); a call's options override.
    pub install: InstallOptions,
    /// Download settings for URLs.
    pub fetch: FetchOptions,
    /// The update channel, for `Check` and `Update`.
    pub channel: ChannelRequest,
    /// What `Update` does after the check (strategy, cache, tries, sentinel).
    pub update: UpdateSettings,
}

/// The D-Bus errors, named `io.abupdate.Updater1.Error.*`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.abupdate.Updater1.Error")]
pub enum ServiceError {
    /// A zbus error.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Another operation is in progress.
    Busy(String),
    /// The operation failed: `exit N: message`, N the CLI's exit code.
    Failed(String),
    /// A bad argument.
    InvalidArgs(String),
}

/// The operation in progress and the last outcome, shared with the worker thread.
#[derive(Debug, Default)]
struct Shared {
    operation: String,
    phase: String,
    /// Bytes of earlier parts (the root image before a kernel part), counted twice.
    base: u64,
    /// The current part's size, bytes written and bytes read back.
    part: (u64, u64, u64),
    last_error: (String, i32),
    last_signal: Option<Instant>,
    /// The last channel check's report (`check --json`), empty before the first.
    verdict: String,
    /// An adaptive install: its writes copy from the running slot where they can.
    adaptive: bool,
}

impl Shared {
    /// (done, total): every byte counts twice, once written and once read back, so done
    /// reaches total only when the last byte was read back against the signed hash.
    fn bytes(&self) -> (u64, u64) {
        let (size, written, read_back) = self.part;
        (self.base + written + read_back, self.base + 2 * size)
    }
}

/// One slot as the `Slots` property gives it: the fields of `status --json`, in this order
/// (D-Bus signature `(susyybbbbtsu)`); `version` is empty and `kernel_partition` 0 when absent.
#[derive(
    Debug,
    Clone,
    serde::Serialize,
    serde::Deserialize,
    zbus::zvariant::Type,
    zbus::zvariant::Value,
    zbus::zvariant::OwnedValue,
)]
pub struct SlotInfo {
    /// Label.
    pub name: String,
    /// 1-based partition number.
    pub partition: u32,
    /// Unique partition GUID.
    pub partuuid: String,
    /// cgpt priority.
    pub priority: u8,
    /// cgpt tries.
    pub tries: u8,
    /// cgpt successful.
    pub successful: bool,
    /// Whether cgptlib would boot it.
    pub bootable: bool,
    /// Whether it boots next.
    pub next_boot: bool,
    /// Whether it is the running slot (when known).
    pub running: bool,
    /// Partition size in bytes.
    pub size_bytes: u64,
    /// Installed version, from the slot record.
    pub version: String,
    /// Its KERN partition, on a disk with the boot chain.
    pub kernel_partition: u32,
}

/// The object served at [`OBJECT_PATH`].
pub struct Updater {
    config: ServiceConfig,
    shared: Arc<Mutex<Shared>>,
    cancel: Arc<AtomicBool>,
    connection: Arc<OnceLock<zbus::blocking::Connection>>,
}

impl Updater {
    /// A service over `config`.
    pub fn new(config: ServiceConfig) -> Self {
        Updater {
            config,
            shared: Arc::default(),
            cancel: Arc::new(AtomicBool::new(false)),
            connection: Arc::new(OnceLock::new()),
        }
    }

    /// Marks an operation started, or says which one is running.
    fn begin(&self, operation: &str) -> Result<(), ServiceError> {
        let mut s = self.shared.lock().expect("service state");
        if !s.operation.is_empty() {
            return Err(ServiceError::Busy(format!(
                "{} is in progress; one operation at a time",
                s.operation
            )));
        }
        *s = Shared {
            operation: operation.to_string(),
            phase: "checking".into(),
            last_error: std::mem::take(&mut s.last_error),
            verdict: std::mem::take(&mut s.verdict),
            ..Shared::default()
        };
        self.cancel.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Starts `operation` on a worker thread (the D-Bus call returns at once); its end is
    /// recorded and signalled by [`finish`].
    fn in_background<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&Worker) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<(), ServiceError> {
        self.begin(operation)?;
        let worker = Worker {
            config: self.config.clone(),
            shared: Arc::clone(&self.shared),
            cancel: Arc::clone(&self.cancel),
            connection: Arc::clone(&self.connection),
        };
        std::thread::spawn(move || {
            let result = work(&worker);
            finish(&worker.shared, &worker.connection, operation, &result);
        });
        Ok(())
    }

    /// A slot operation, run in the call (they take milliseconds).
    fn slot_operation(
        &self,
        operation: &str,
        slot: Option<&str>,
        run: impl FnOnce(
            &mut crate::disk::slots::AbDisk<crate::disk::blockdev::FileDevice>,
            usize,
        ) -> Result<
            crate::boot::slot_ops::SlotChange,
            crate::boot::slot_ops::CommitError,
        >,
    ) -> Result<String, ServiceError> {
        self.begin(operation)?;
        let result = (|| -> anyhow::Result<String> {
            let mut disk = self.config.disk.open_locked()?;
            let slots = disk.slots()?;
            let fallback = crate::disk::running::Fallback::Nothing;
            // No slot named: the running one (or the one the configuration names as running).
            let slot = slot.or(self.config.install.running.as_deref());
            let index = crate::disk::running::find(&disk, &slots, slot, fallback)?
                .map(|r| r.index)
                .ok_or_else(|| anyhow::anyhow!("cannot tell which slot is running: name one"))?;
            let change = run(&mut disk, index)?;
            Ok(format!(
                "{}: {} -> {}",
                change.slot, change.before, change.after
            ))
        })();
        finish(&self.shared, &self.connection, operation, &result);
        result.map_err(|e| failed(&e))
    }
}

/// What a background operation works with.
struct Worker {
    config: ServiceConfig,
    shared: Arc<Mutex<Shared>>,
    cancel: Arc<AtomicBool>,
    connection: Arc<OnceLock<zbus::blocking::Connection>>,
}

/// `exit N: message` for an error, N the CLI's exit code for it.
fn failed(e: &anyhow::Error) -> ServiceError {
    let code = crate::exit::classify_chain(e.as_ref()) as i32;
    ServiceError::Failed(format!(
        "exit {code}: {}",
        crate::exit::one_line(e.as_ref())
    ))
}

/// Ends the operation: the last error and the `Completed` signal.
fn finish<T>(
    shared: &Mutex<Shared>,
    connection: &OnceLock<zbus::blocking::Connection>,
    operation: &str,
    result: &anyhow::Result<T>,
) {
    let (code, message) = match result {
        Ok(_) => (0, String::new()),
        Err(e) => (
            crate::exit::classify_chain(e.as_ref()) as i32,
            crate::exit::one_line(e.as_ref()),
        ),
    };
    {
        let mut s = shared.lock().expect("service state");
        s.operation.clear();
        s.phase = if code == 0 { "done" } else { "failed" }.into();
        if code != 0 {
            s.last_error = (message.clone(), code);
        }
    }
    if let Some(emitter) = emitter(connection) {
        let _ = zbus::block_on(Updater::completed(&emitter, operation, code, &message));
    }
}

fn emitter(connection: &OnceLock<zbus::blocking::Connection>) -> Option<SignalEmitter<'static>> {
    let conn = connection.get()?;
    SignalEmitter::new(conn.inner(), OBJECT_PATH)
        .ok()
        .map(|e| e.into_owned())
}

/// Records an install event and sends `ProgressUpdate` (phase changes always, byte counts at
/// most [`SIGNALS_PER_SECOND`] times a second).
fn on_event(
    shared: &Mutex<Shared>,
    connection: &OnceLock<zbus::blocking::Connection>,
    event: &InstallEvent,
) {
    let send = {
        let mut s = shared.lock().expect("service state");
        let writing = if s.adaptive { "copying" } else { "writing" };
        let phase = match *event {
            InstallEvent::AdaptivePlan { .. } => {
                s.adaptive = true;
                return;
            }
            InstallEvent::Written { bytes, total } => {
                (s.part.0, s.part.1) = (total, bytes);
                writing
            }
            InstallEvent::ReadBack { bytes, .. } => {
                s.part.2 = bytes;
                "reading-back"
            }
            InstallEvent::KernelPart { size, .. } => {
                s.base += 2 * s.part.0;
                s.part = (size, 0, 0);
                writing
            }
            // The target is unbootable now and its first bytes are on their way.
            InstallEvent::TargetInvalidated { .. } => writing,
            InstallEvent::Activated { .. } => "flipping",
            _ => return,
        };
        let phase_changed = s.phase != phase;
        s.phase = phase.into();
        let (done, total) = s.bytes();
        let due = s
            .last_signal
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1) / SIGNALS_PER_SECOND);
        let send = phase_changed || due || done == total;
        if send {
            s.last_signal = Some(Instant::now());
        }
        send.then_some((done, total, phase))
    };
    if let (Some((done, total, phase)), Some(emitter)) = (send, emitter(connection)) {
        let _ = zbus::block_on(Updater::progress_update(&emitter, done, total, phase));
    }
}

#[zbus::interface(name = "io.abupdate.Updater1")]
impl Updater {
    /// Installs a bundle (file path or URL) into the inactive slot, as `abupdate install`
    /// does; returns at once, the outcome comes as `Completed`. Options: `adaptive` (b),
    /// `allow-downgrade` (b), `tries` (y), `compatible` (s), `running` (s).
    fn install(
        &self,
        source: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<(), ServiceError> {
        let mut install = self.config.install.clone();
        for (key, value) in &options {
            let bad = |what: &str| ServiceError::InvalidArgs(format!("option {key}: {what}"));
            match key.as_str() {
                "adaptive" => {
                    install.adaptive = bool::try_from(value).map_err(|_| bad("want b"))?
                }
                "allow-downgrade" => {
                    install.allow_downgrade = bool::try_from(value).map_err(|_| bad("want b"))?
                }
                "tries" => install.tries = u8::try_from(value).map_err(|_| bad("want y"))?,
                "compatible" => {
                    install.compatible =
                        Some(<&str>::try_from(value).map_err(|_| bad("want s"))?.into())
                }
                "running" => {
                    install.running =
                        Some(<&str>::try_from(value).map_err(|_| bad("want s"))?.into())
                }
                _ => return Err(bad("unknown")),
            }
        }
        self.in_background("install", move |w| {
            run_install(&w.config, &source, &install, &w.cancel, &mut |e| {
                on_event(&w.shared, &w.connection, &e)
            })
        })
    }

    /// `abupdate check`: asks the update channel; returns at once, the report comes as the
    /// `ChannelVerdict` property, then `Completed`.
    fn check(&self) -> Result<(), ServiceError> {
        self.in_background("check", |w| {
            let fetcher = crate::fetch::http::Fetcher::new(w.config.fetch.clone())?;
            let checked = crate::fetch::update::check(
                &w.config.disk,
                &w.config.channel,
                &fetcher,
                &mut |_| {},
            )?;
            w.shared.lock().expect("service state").verdict =
                serde_json::to_string(&checked.report)?;
            Ok(())
        })
    }

    /// `abupdate update`: checks the channel and acts on the update strategy (install,
    /// download only, or nothing), with the same progress as `Install`; returns at once.
    fn update(&self) -> Result<(), ServiceError> {
        self.in_background("update", |w| {
            let fetcher = crate::fetch::http::Fetcher::new(w.config.fetch.clone())?
                .with_cancel(Arc::clone(&w.cancel));
            let mut events = |e: UpdateEvent| match e {
                UpdateEvent::Checked(report) => {
                    if let Ok(json) = serde_json::to_string(report) {
                        w.shared.lock().expect("service state").verdict = json;
                    }
                }
                UpdateEvent::Install(e) => on_event(&w.shared, &w.connection, &e),
                _ => {}
            };
            Ok(crate::fetch::update::update(
                &w.config.disk,
                &w.config.channel,
                &w.config.update,
                &fetcher,
                &w.cancel,
                &mut events,
            )?)
        })
    }

    /// Stops the operation in progress at its next chunk (an install leaves its target
    /// unbootable, as a signal to the CLI does).
    fn cancel(&self) -> Result<(), ServiceError> {
        if self
            .shared
            .lock()
            .expect("service state")
            .operation
            .is_empty()
        {
            return Err(ServiceError::InvalidArgs("no operation in progress".into()));
        }
        self.cancel.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `abupdate mark-good --slot SLOT` (empty: the running slot).
    fn mark_good(&self, slot: String) -> Result<String, ServiceError> {
        let slot = (!slot.is_empty()).then_some(slot);
        self.slot_operation("mark-good", slot.as_deref(), |d, i| {
            crate::boot::slot_ops::mark_good(d, i, false)
        })
    }

    /// `abupdate mark-bad --slot SLOT` (empty: the running slot); never the last good slot.
    fn mark_bad(&self, slot: String) -> Result<String, ServiceError> {
        let slot = (!slot.is_empty()).then_some(slot);
        self.slot_operation("mark-bad", slot.as_deref(), |d, i| {
            crate::boot::slot_ops::mark_bad(d, i, false)
        })
    }

    /// `abupdate rollback`: the other slot boots next, if it is committed.
    fn rollback(&self) -> Result<String, ServiceError> {
        self.slot_operation("rollback", None, crate::boot::slot_ops::rollback)
    }

    /// `status --json`: the slots, their attributes and versions, both GPT copies.
    #[zbus(property(emits_changed_signal = "false"))]
    fn status(&self) -> String {
        status_json(&self.config.disk).unwrap_or_else(|e| {
            serde_json::json!({ "error": crate::exit::one_line(e.as_ref()) }).to_string()
        })
    }

    /// The slots, as `status` shows them.
    #[zbus(property(emits_changed_signal = "false"))]
    fn slots(&self) -> Vec<SlotInfo> {
        slot_infos(&self.config.disk).unwrap_or_default()
    }

    /// The slot the system runs from (kernel command line, marker file, root device), empty
    /// when this is not the live disk.
    #[zbus(property(emits_changed_signal = "false"))]
    fn running(&self) -> String {
        slot_names(&self.config.disk).map_or_else(|_| String::new(), |n| n.0)
    }

    /// The slot that boots next, empty when none is bootable.
    #[zbus(property(emits_changed_signal = "false"))]
    fn next_boot(&self) -> String {
        slot_names(&self.config.disk).map_or_else(|_| String::new(), |n| n.1)
    }

    /// The last channel check (`check --json`: verdict, versions, bundle URLs), empty before
    /// the first `Check` or `Update`.
    #[zbus(property(emits_changed_signal = "false"))]
    fn channel_verdict(&self) -> String {
        self.shared.lock().expect("service state").verdict.clone()
    }

    /// The operation in progress (`install`, `mark-good`, ...), empty when idle.
    #[zbus(property(emits_changed_signal = "false"))]
    fn operation(&self) -> String {
        self.shared.lock().expect("service state").operation.clone()
    }

    /// (bytes done, bytes total, phase): phases `checking`, `writing` (`copying` in an
    /// adaptive install: chunks come from the running slot where it has them), `reading-back` (they
    /// overlap: the read-back follows the writes region by region), `flipping`, then `done` or
    /// `failed`. Each image byte counts twice, written and read back, so done reaches total
    /// only after the last read-back; a kernel part adds twice its size when it starts.
    #[zbus(property(emits_changed_signal = "false"))]
    fn progress(&self) -> (u64, u64, String) {
        let s = self.shared.lock().expect("service state");
        let (done, total) = s.bytes();
        (done, total, s.phase.clone())
    }

    /// (message, exit code) of the last failed operation; ("", 0) when none failed.
    #[zbus(property(emits_changed_signal = "false"))]
    fn last_error(&self) -> (String, i32) {
        self.shared
            .lock()
            .expect("service state")
            .last_error
            .clone()
    }

    /// Progress of the operation (rate-limited).
    #[zbus(signal)]
    async fn progress_update(
        emitter: &SignalEmitter<'_>,
        done: u64,
        total: u64,
        phase: &str,
    ) -> zbus::Result<()>;

    /// An operation ended: its name, the exit code the CLI would give (0: success) and the
    /// error line.
    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        operation: &str,
        exit_code: i32,
        message: &str,
    ) -> zbus::Result<()>;
}

/// The install itself: the CLI's path ([`crate::fetch::update::install_from`]).
fn run_install(
    config: &ServiceConfig,
    source: &str,
    options: &InstallOptions,
    cancel: &Arc<AtomicBool>,
    events: &mut dyn FnMut(InstallEvent),
) -> anyhow::Result<crate::install::InstallReport> {
    let keyring = crate::bundle::Keyring::load(&config.keyring)?;
    let mut disk = config.disk.open_locked()?;
    let bundle = match crate::fetch::http::is_url(source) {
        true => {
            let fetcher = crate::fetch::http::Fetcher::new(config.fetch.clone())?
                .with_cancel(Arc::clone(cancel));
            crate::fetch::update::open_url(&fetcher, source, Default::default(), cancel)?
        }
        false => crate::install::open_bundle_source(std::path::Path::new(source))?,
    };
    Ok(crate::fetch::update::install_from(
        &mut disk, bundle, &keyring, options, cancel, events,
    )?)
}

/// (running, next boot) slot names, empty when unknown.
fn slot_names(disk: &DiskSpec) -> anyhow::Result<(String, String)> {
    let report = status_report(disk)?;
    Ok((
        report.running.unwrap_or_default(),
        report.next_boot.unwrap_or_default(),
    ))
}

/// `status`'s report ([`crate::disk::running::status_report`]).
fn status_report(disk: &DiskSpec) -> anyhow::Result<crate::disk::slots::Status> {
    Ok(crate::disk::running::status_report(
        &mut disk.open(false)?,
        None,
    )?)
}

fn status_json(disk: &DiskSpec) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&status_report(disk)?)?)
}

fn slot_infos(disk: &DiskSpec) -> anyhow::Result<Vec<SlotInfo>> {
    Ok(status_report(disk)?
        .slots
        .into_iter()
        .map(|s| SlotInfo {
            name: s.name,
            partition: s.partition,
            partuuid: s.partuuid,
            priority: s.fields.priority,
            tries: s.fields.tries,
            successful: s.fields.successful,
            bootable: s.bootable,
            next_boot: s.next_boot,
            running: s.running,
            size_bytes: s.size_bytes,
            version: s.version.unwrap_or_default(),
            kernel_partition: s.kernel_partition.unwrap_or(0),
        })
        .collect())
}

/// Serves the interface on `address` (a D-Bus address; `None`: the system bus) until the
/// connection ends.
pub fn serve(config: ServiceConfig, address: Option<&str>) -> anyhow::Result<()> {
    let updater = Updater::new(config);
    let connection_cell = Arc::clone(&updater.connection);
    let builder = match address {
        Some(a) => zbus::blocking::connection::Builder::address(a)?,
        None => zbus::blocking::connection::Builder::system()?,
    };
    let connection = builder
        .name(BUS_NAME)?
        .serve_at(OBJECT_PATH, updater)?
        .build()?;
    let _ = connection_cell.set(connection.clone());
    eprintln!("abupdate service: {BUS_NAME} at {OBJECT_PATH}");
    loop {
        std::thread::park();
    }
}
