//! Update orchestration behind `check` and `update`: inspect the node, ask the channel, decide,
//! then act on the strategy (install, download into the cache, or nothing). Everything the
//! caller shows comes through one event callback ([`UpdateEvent`], which carries the
//! install's own [`InstallEvent`]s) and the returned [`UpdateOutcome`]; nothing here prints.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::attrs::SlotAttributes;
use crate::bundle::{BundleError, BundleSource, KeyError, Keyring};
use crate::config::Strategy;
use crate::disk::blockdev::FileDevice;
use crate::disk::record;
use crate::disk::slots::{AbDisk, DiskSpec, OpenDiskError};
use crate::exit::Exit;
use crate::fetch::channel::{ChannelError, Downloaded, Found, SlotView, Verdict};
use crate::fetch::http::{Expected, Fetcher, HttpError};
use crate::install::{InstallError, InstallEvent, InstallOptions, InstallReport};

/// Errors of `check` and `update`.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Opening the disk failed.
    #[error(transparent)]
    Disk(#[from] OpenDiskError),
    /// Reading the slots failed.
    #[error(transparent)]
    Slots(#[from] crate::disk::slots::SlotError),
    /// The keyring could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The channel (index, download, cache) failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A bundle download failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// A bundle could not be read.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The install was refused or failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The cached bundle is not the one the index names.
    #[error("cached bundle {} is not the one the channel index names; delete it", .path.display())]
    CachedBundleMismatch {
        /// The cached file.
        path: PathBuf,
    },
    /// Opening a file failed.
    #[error("opening {}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Writing the reboot sentinel failed.
    #[error("writing the reboot sentinel {}", .path.display())]
    Sentinel {
        /// The sentinel.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl UpdateError {
    /// The error that decides the exit code: the wrapped one, or this one.
    pub fn inner(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            UpdateError::Disk(e) => e.inner(),
            UpdateError::Slots(e) => e,
            UpdateError::Key(e) => e,
            UpdateError::Channel(e) => e,
            UpdateError::Http(e) => e,
            UpdateError::Bundle(e) => e,
            UpdateError::Install(e) => e,
            UpdateError::CachedBundleMismatch { .. }
            | UpdateError::Open { .. }
            | UpdateError::Sentinel { .. } => self,
        }
    }
}

/// What the channel is asked, and how this node is identified.
#[derive(Debug, Clone, Default)]
pub struct ChannelRequest {
    /// Channel index URLs, tried in order.
    pub channels: Vec<String>,
    /// Trusted key file or directory.
    pub keyring: PathBuf,
    /// This device's compatible string (default: the running slot's recorded one).
    pub compatible: Option<String>,
    /// The running slot, when it cannot be detected.
    pub running: Option<String>,
}

/// What `update` does beyond the check.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    /// Install, download only, or nothing.
    pub strategy: Strategy,
    /// The download cache.
    pub cache_dir: PathBuf,
    /// Tries given to the new slot.
    pub tries: u8,
    /// Adaptive install.
    pub adaptive: bool,
    /// The reboot-required sentinel to write, if any.
    pub sentinel: Option<PathBuf>,
}

/// Events of `check` and `update`, in order.
#[derive(Debug)]
pub enum UpdateEvent<'a> {
    /// A channel mirror failed; the next one is tried.
    ChannelMirrorFailed {
        /// The mirror.
        url: &'a str,
        /// Why.
        error: &'a ChannelError,
    },
    /// The channel was checked (`update` only; `check` returns its report).
    Checked(&'a CheckReport),
    /// Download progress of a download-only update (`label`: downloading, then verifying).
    Download {
        /// What is being done.
        label: &'a str,
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// A bundle mirror failed during a download-only update; the next one is tried.
    DownloadMirrorFailed {
        /// The mirror.
        url: &'a str,
        /// Why.
        error: &'a ChannelError,
    },
    /// The install reads a verified download waiting in the cache.
    InstallingFromCache {
        /// The version.
        version: &'a str,
        /// The cached bundle.
        path: &'a Path,
    },
    /// An install attempt's event.
    Install(InstallEvent),
    /// A bundle mirror failed during an install (a new attempt starts with the next one).
    BundleMirrorFailed {
        /// The mirror.
        url: &'a str,
        /// Why, on one line.
        error: String,
    },
}

/// What `update` did.
#[derive(Debug)]
pub enum UpdateOutcome {
    /// The strategy is off: nothing was opened or fetched.
    Off,
    /// Nothing to do.
    NoUpdate {
        /// Why.
        verdict: Verdict,
        /// The verdict, described.
        message: String,
    },
    /// The other slot already holds the version and boots next; the sentinel was written.
    PendingReboot {
        /// Why.
        verdict: Verdict,
        /// The slot.
        slot: String,
        /// The version.
        version: String,
    },
    /// Downloaded and verified into the cache.
    Downloaded {
        /// The version.
        version: String,
        /// Where.
        download: Downloaded,
    },
    /// Installed.
    Installed(InstallReport),
}

/// What `check` reports (and `update` emits as its `check` event).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The decision.
    pub verdict: Verdict,
    /// Whether a newer compatible version is available.
    pub update_available: bool,
    /// The verdict, described.
    pub message: String,
    /// The running slot.
    pub running_slot: String,
    /// Its version.
    pub running_version: Option<String>,
    /// This device's compatible string.
    pub device_compatible: String,
    /// The channel's version.
    pub latest_version: String,
    /// The channel's compatible string.
    pub channel_compatible: String,
    /// The channel URL that served the index (as configured).
    pub channel: String,
    /// Where the index was fetched from.
    pub index_url: String,
    /// The key the index verified under.
    pub key_id: String,
    /// The bundle URLs.
    pub bundle_urls: Vec<String>,
    /// Bundle size.
    pub size: u64,
    /// Image hash.
    pub sha256: String,
    /// Mirrors that failed before one answered.
    pub skipped_mirrors: Vec<serde_json::Value>,
}

impl CheckReport {
    /// One line of text.
    pub fn text(&self) -> String {
        format!(
            "{} runs {}; channel {} offers {} for {}: {}",
            self.running_slot,
            self.running_version
                .as_deref()
                .unwrap_or("an unknown version"),
            self.index_url,
            self.latest_version,
            self.channel_compatible,
            self.message
        )
    }
}

/// The node as `check` and `update` see it.
struct Node {
    running: usize,
    other: usize,
    attrs: Vec<SlotAttributes>,
    views: Vec<SlotView>,
    device_compatible: String,
}

fn inspect_node(
    disk: &mut AbDisk<FileDevice>,
    running: Option<&str>,
    compatible: Option<&str>,
) -> Result<Node, UpdateError> {
    let slots = disk.slots()?;
    let attrs: Vec<_> = slots.iter().map(|s| s.attrs).collect();
    let (running, other) = crate::install::running_and_target(disk, &slots, running)?;
    let running = running.index;
    let sector_size = disk.gpt.sector_size();
    let records: Vec<_> = slots
        .iter()
        .map(|s| record::read_record(&mut disk.dev, s, sector_size))
        .collect();
    let views = slots
        .iter()
        .zip(&records)
        .map(|(s, r)| SlotView {
            name: s.name.clone(),
            attrs: s.attrs,
            version: r.as_ref().map(|r| r.version.clone()),
            sha256: r.as_ref().map(|r| r.image_sha256),
        })
        .collect();
    let device_compatible = compatible
        .map(String::from)
        .or_else(|| records[running].as_ref().map(|r| r.compatible.clone()))
        .ok_or_else(|| InstallError::CompatibleUnknown {
            slot: slots[running].name.clone(),
        })?;
    Ok(Node {
        running,
        other,
        attrs,
        views,
        device_compatible,
    })
}

/// The result of [`check`].
pub struct Checked {
    node: Node,
    /// The verified index and where it came from.
    pub found: Found,
    /// The report.
    pub report: CheckReport,
    keyring: Keyring,
}

/// Inspects the node and asks the channel whether a newer compatible version exists.
pub fn check(
    disk: &DiskSpec,
    request: &ChannelRequest,
    fetcher: &Fetcher,
    events: &mut dyn FnMut(UpdateEvent),
) -> Result<Checked, UpdateError> {
    let keyring = Keyring::load(&request.keyring)?;
    let node = inspect_node(
        &mut disk.open(false)?,
        request.running.as_deref(),
        request.compatible.as_deref(),
    )?;
    let found = crate::fetch::channel::fetch_index(
        fetcher,
        &request.channels,
        &keyring,
        &mut |url, error| events(UpdateEvent::ChannelMirrorFailed { url, error }),
    )?;
    let running = &node.views[node.running];
    let verdict = crate::fetch::channel::decide(
        running,
        &node.views[node.other],
        &node.attrs,
        node.other,
        &node.device_compatible,
        &found.index,
    );
    let report = CheckReport {
        verdict,
        update_available: verdict == Verdict::Available,
        message: verdict.describe().to_string(),
        running_slot: running.name.clone(),
        running_version: running.version.clone(),
        device_compatible: node.device_compatible.clone(),
        latest_version: found.index.version.clone(),
        channel_compatible: found.index.compatible.clone(),
        channel: found.channel.clone(),
        index_url: found.index_url.clone(),
        key_id: found.key_id.to_string(),
        bundle_urls: found.bundle_urls.clone(),
        size: found.index.size,
        sha256: found.index.sha256.clone(),
        skipped_mirrors: found
            .skipped
            .iter()
            .map(|(u, e)| serde_json::json!({"url": u, "error": e}))
            .collect(),
    };
    Ok(Checked {
        node,
        found,
        report,
        keyring,
    })
}

/// Checks the channel and acts on `settings.strategy`. `fetcher` should carry `cancel`, which
/// the install polls too.
pub fn update(
    disk: &DiskSpec,
    request: &ChannelRequest,
    settings: &UpdateSettings,
    fetcher: &Fetcher,
    cancel: &Arc<AtomicBool>,
    events: &mut dyn FnMut(UpdateEvent),
) -> Result<UpdateOutcome, UpdateError> {
    if settings.strategy == Strategy::Off {
        return Ok(UpdateOutcome::Off);
    }
    let Checked {
        node,
        found,
        report,
        keyring,
    } = check(disk, request, fetcher, events)?;
    events(UpdateEvent::Checked(&report));
    let index = &found.index;
    let other = node.views[node.other].name.clone();
    match report.verdict {
        Verdict::Incompatible => {
            return Err(InstallError::Incompatible {
                bundle: index.compatible.clone(),
                device: node.device_compatible.clone(),
            }
            .into())
        }
        Verdict::UpToDate | Verdict::PreviouslyFailed | Verdict::RunningNotCommitted => {
            return Ok(UpdateOutcome::NoUpdate {
                verdict: report.verdict,
                message: report.message,
            });
        }
        Verdict::PendingReboot => {
            if let Some(path) = &settings.sentinel {
                crate::install::write_sentinel(path, &other, &index.version).map_err(|source| {
                    UpdateError::Sentinel {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            return Ok(UpdateOutcome::PendingReboot {
                verdict: report.verdict,
                slot: other,
                version: index.version.clone(),
            });
        }
        Verdict::Available => {}
    }

    if settings.strategy == Strategy::DownloadOnly {
        // Both callbacks report through the one event sink.
        let events = std::cell::RefCell::new(events);
        let download = crate::fetch::channel::download_to_cache(
            fetcher,
            &found,
            &keyring,
            &settings.cache_dir,
            &mut |label, done, total| {
                (events.borrow_mut())(UpdateEvent::Download { label, done, total })
            },
            &mut |url, error| {
                (events.borrow_mut())(UpdateEvent::DownloadMirrorFailed { url, error })
            },
        )?;
        return Ok(UpdateOutcome::Downloaded {
            version: index.version.clone(),
            download,
        });
    }

    // Auto: install, from the cache when a verified download is waiting there.
    let options = InstallOptions {
        tries: settings.tries,
        allow_downgrade: false,
        compatible: Some(node.device_compatible.clone()),
        running: Some(node.views[node.running].name.clone()),
        sentinel: settings.sentinel.clone(),
        workers: 0,
        adaptive: settings.adaptive,
        dry_run: false,
    };
    let mut disk = disk.open_locked()?;
    if let Some(path) = crate::fetch::channel::cached_bundle(&settings.cache_dir, index) {
        events(UpdateEvent::InstallingFromCache {
            version: &index.version,
            path: &path,
        });
        let file = std::fs::File::open(&path).map_err(|source| UpdateError::Open {
            path: path.clone(),
            source,
        })?;
        let header = crate::bundle::read_unverified_header(&mut BufReader::new(file))?;
        if hex::encode(header.image_sha256) != index.sha256 {
            return Err(UpdateError::CachedBundleMismatch { path });
        }
        let source = crate::install::open_bundle_source(&path)?;
        let report = install_from(&mut disk, source, &keyring, &options, cancel, &mut |e| {
            events(UpdateEvent::Install(e))
        })?;
        crate::fetch::channel::prune_cache(&settings.cache_dir, None)?;
        return Ok(UpdateOutcome::Installed(report));
    }
    for (i, url) in found.bundle_urls.iter().enumerate() {
        let attempt = open_url(fetcher, url, index.expected(), cancel)
            .map_err(UpdateError::from)
            .and_then(|source| {
                install_from(&mut disk, source, &keyring, &options, cancel, &mut |e| {
                    events(UpdateEvent::Install(e))
                })
                .map_err(UpdateError::from)
            });
        match attempt {
            Ok(report) => return Ok(UpdateOutcome::Installed(report)),
            Err(e)
                if i + 1 < found.bundle_urls.len()
                    && crate::exit::classify_chain(&e) == Exit::FetchFailed =>
            {
                events(UpdateEvent::BundleMirrorFailed {
                    url,
                    error: crate::exit::one_line(&e),
                });
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the channel index names at least one bundle URL")
}

/// Opens a bundle URL for streaming; the first request may wait up to the read timeout for
/// a silent server, so it waits on its own thread and `cancel` ends the wait.
pub fn open_url(
    fetcher: &Fetcher,
    url: &str,
    expected: Expected,
    cancel: &AtomicBool,
) -> Result<Box<dyn BundleSource>, HttpError> {
    let (fetcher, url) = (fetcher.clone(), url.to_string());
    let source = crate::bundle::run_interruptible(cancel, move || fetcher.open(&url, 0, expected))
        .map_err(|_| HttpError::Cancelled)??;
    Ok(Box::new(std::io::BufReader::with_capacity(
        crate::fetch::http::STREAM_BUFFER,
        source,
    )))
}

/// Runs the install pipeline on `source`, whose reads wait on their own thread so that a
/// stalled pipe or server cannot hold up a signal (`cancel`).
pub fn install_from(
    disk: &mut AbDisk<FileDevice>,
    source: Box<dyn BundleSource>,
    keyring: &Keyring,
    options: &InstallOptions,
    cancel: &Arc<AtomicBool>,
    events: &mut dyn FnMut(InstallEvent),
) -> Result<InstallReport, InstallError> {
    let source = crate::bundle::Interruptible::new(source, Arc::clone(cancel))?;
    crate::install::install(disk, source, keyring, options, cancel, events)
}
