//! The configuration file, `/etc/abupdate.toml` by default.
//!
//! Every key is optional and every key has a command-line flag; a flag wins over the file,
//! and the file wins over the built-in default. Unknown keys are an error naming the key, the
//! line and the file, so a typo never silently turns a setting off. A missing file at the
//! default path means "all defaults"; a file named explicitly (`--config`, `ABUPDATE_CONFIG`)
//! must exist. docs/fleet.md lists the keys with an example.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::fetch::http::{self, FetchOptions};

/// Default path of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/abupdate.toml";
/// Environment variable naming the configuration file (like `--config`).
pub const ENV_VAR: &str = "ABUPDATE_CONFIG";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("config file {path}, line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// The parser's message (names the unknown key and the keys allowed).
        message: String,
    },
    /// A value is out of range.
    #[error("config file {path}: {key}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A required setting is given neither by flag nor in the file.
    #[error("no {what}: pass {flag} or set `{key}` in the config file ({path})")]
    Unset {
        /// What is missing.
        what: &'static str,
        /// The flag.
        flag: &'static str,
        /// The config key.
        key: &'static str,
        /// The config file consulted (or the default path).
        path: String,
    },
}

/// What `abupdate update` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Check, download and install; the reboot follows the reboot policy.
    #[default]
    Auto,
    /// Check, download and fully verify into the cache directory; a later `update` with
    /// strategy `auto` (or `install FILE`) installs it from there.
    DownloadOnly,
    /// Do nothing: the node is managed from outside (replaced, not updated).
    Off,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::DownloadOnly => "download-only",
            Strategy::Off => "off",
        })
    }
}

/// Who reboots after an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    /// Write the reboot-required sentinel for a fleet coordinator (kured) and return.
    #[default]
    Sentinel,
    /// Reboot at once.
    Now,
    /// Neither: the operator reboots.
    None,
}

/// The `[fetch]` table: download behaviour.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FetchConfig {
    /// Reconnections per download.
    pub retries: Option<u32>,
    /// First back-off delay.
    #[serde(default, deserialize_with = "de_duration")]
    pub retry_delay: Option<Duration>,
    /// Back-off cap.
    #[serde(default, deserialize_with = "de_duration")]
    pub max_retry_delay: Option<Duration>,
    /// Connect timeout.
    #[serde(default, deserialize_with = "de_duration")]
    pub connect_timeout: Option<Duration>,
    /// Read timeout (and low-speed window).
    #[serde(default, deserialize_with = "de_duration")]
    pub read_timeout: Option<Duration>,
    /// Low-speed limit in bytes per second (0: off).
    pub low_speed_limit: Option<u64>,
    /// Redirects followed per request.
    pub max_redirects: Option<u32>,
    /// PEM file of trusted CA certificates.
    pub ca_file: Option<PathBuf>,
}

/// The configuration file's contents. `None` means "not set here".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Disk holding the slots (`--disk`).
    pub disk: Option<PathBuf>,
    /// Slot labels, A first (`--labels`).
    pub labels: Option<Vec<String>>,
    /// Sector size of a disk image file (`--sector-size`).
    pub sector_size: Option<u32>,
    /// Trusted key file or directory (`--keyring`).
    pub keyring: Option<PathBuf>,
    /// This device's compatible string (`--compatible`).
    pub compatible: Option<String>,
    /// Channel index URLs, mirrors in the order tried (`--channel`, repeatable).
    pub channel: Option<Vec<String>>,
    /// Tries given to a new slot (`--tries`).
    pub tries: Option<u8>,
    /// Copy chunks the running slot already holds instead of fetching them (`--adaptive`).
    pub adaptive: Option<bool>,
    /// Update strategy (`--strategy`).
    pub strategy: Option<Strategy>,
    /// Reboot policy after an install (`--reboot`, `--no-sentinel`).
    pub reboot: Option<RebootPolicy>,
    /// Reboot-required sentinel path (`--sentinel`).
    pub sentinel: Option<PathBuf>,
    /// Download cache directory (`--cache-dir`).
    pub cache_dir: Option<PathBuf>,
    /// Health check commands for `commit` (`--check`, repeatable).
    pub health_checks: Option<Vec<String>>,
    /// Time each health check may take (`commit --timeout`).
    #[serde(default, deserialize_with = "de_duration")]
    pub health_timeout: Option<Duration>,
    /// Download behaviour.
    pub fetch: Option<FetchConfig>,
}

/// A loaded configuration and the file it came from (`None`: no file, all defaults).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The settings.
    pub config: Config,
    /// The file read.
    pub path: Option<PathBuf>,
}

impl Loaded {
    /// The file consulted, for messages (the default path when none was read).
    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => format!("{DEFAULT_PATH}, absent"),
        }
    }

    /// [`ConfigError::Unset`] for a missing required setting.
    pub fn unset(&self, what: &'static str, flag: &'static str, key: &'static str) -> ConfigError {
        ConfigError::Unset {
            what,
            flag,
            key,
            path: self.describe(),
        }
    }
}

/// Loads the configuration: `explicit` (from `--config` or `ABUPDATE_CONFIG`) must exist;
/// otherwise [`DEFAULT_PATH`] is read if it exists.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded::default())
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let config = parse(&text, &path)?;
    Ok(Loaded {
        config,
        path: Some(path),
    })
}

/// Parses and validates the text of a configuration file; `path` is for messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        line: e.span().map_or(1, |s| {
            text[..s.start.min(text.len())].matches('\n').count() + 1
        }),
        message: e.message().trim().to_string(),
    })?;
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason,
    };
    if let Some(labels) = &config.labels {
        // The same check as for --labels and ABUPDATE_LABELS (crate::layout).
        crate::layout::SlotLabels::new(labels.clone())
            .map_err(|e| invalid("labels", e.to_string()))?;
    }
    if let Some(ss) = config.sector_size {
        if ss != 512 && ss != 4096 {
            return Err(invalid("sector-size", format!("{ss} is not 512 or 4096")));
        }
    }
    if let Some(t) = config.tries {
        if !(1..=15).contains(&t) {
            return Err(invalid("tries", format!("{t} is not in 1..=15")));
        }
    }
    if let Some(urls) = &config.channel {
        if let Some(bad) = urls.iter().find(|u| !http::is_url(u)) {
            return Err(invalid(
                "channel",
                format!("{bad:?} is not an http:// or https:// URL"),
            ));
        }
    }
    if config.health_timeout == Some(Duration::ZERO) {
        return Err(invalid("health-timeout", "must be more than 0".into()));
    }
    Ok(config)
}

impl Config {
    /// The download options: the `[fetch]` table over the defaults.
    pub fn fetch_options(&self) -> FetchOptions {
        let d = FetchOptions::default();
        let f = self.fetch.clone().unwrap_or_default();
        FetchOptions {
            retries: f.retries.unwrap_or(d.retries),
            retry_delay: f.retry_delay.unwrap_or(d.retry_delay),
            max_retry_delay: f.max_retry_delay.unwrap_or(d.max_retry_delay),
            connect_timeout: f.connect_timeout.unwrap_or(d.connect_timeout),
            read_timeout: f.read_timeout.unwrap_or(d.read_timeout),
            low_speed_limit: f.low_speed_limit.unwrap_or(d.low_speed_limit),
            max_redirects: f.max_redirects.unwrap_or(d.max_redirects),
            ca_file: f.ca_file.or(d.ca_file),
        }
    }
}

/// Parses a duration: a number of seconds (`30`, `0.5`) or a number with a unit (`500ms`,
/// `30s`, `5m`, `1h`, `7d`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (e.g. 30, 500ms, 2s, 5m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in duration {s:?} (ms, s, m, h, d)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "a duration: seconds as a number, or a string such as \"500ms\", \"30s\", \"5m\"",
            )
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom("a duration cannot be negative"))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
            parse_duration(&v.to_string()).map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
    d.deserialize_any(V).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses() {
        let text = r#"
disk = "/dev/vda"
labels = ["ROOT-A", "ROOT-B"]
keyring = "/etc/abupdate/keys"
compatible = "acme-gw"
channel = ["https://a.example/stable/index.json", "http://b.example/stable/index.json"]
tries = 3
strategy = "download-only"
reboot = "sentinel"
sentinel = "/run/reboot-required"
cache-dir = "/var/cache/abupdate"
health-checks = ["true"]
health-timeout = "2m"

[fetch]
retries = 5
retry-delay = "500ms"
max-retry-delay = 30
connect-timeout = 10
read-timeout = 20.5
low-speed-limit = 0
max-redirects = 3
"#;
        let c = parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.strategy, Some(Strategy::DownloadOnly));
        assert_eq!(c.health_timeout, Some(Duration::from_secs(120)));
        let f = c.fetch_options();
        assert_eq!(f.retries, 5);
        assert_eq!(f.retry_delay, Duration::from_millis(500));
        assert_eq!(f.read_timeout, Duration::from_millis(20_500));
        assert_eq!(f.low_speed_limit, 0);
        assert_eq!(f.max_redirects, 3);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = parse(
            "disk = \"/dev/vda\"\nstrategy = \"auto\"\nretries = 3\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("x.toml") && e.contains("line 3") && e.contains("retries"),
            "{e}"
        );
        let e = parse("[fetch]\nretry = 1\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("retry") && e.contains("line 2"), "{e}");
        assert!(parse("strategy = \"sometimes\"", Path::new("x")).is_err());
        assert!(parse("tries = 0", Path::new("x")).is_err());
        assert!(parse("channel = [\"ftp://x\"]", Path::new("x")).is_err());
        assert!(parse("labels = [\"A\"]", Path::new("x")).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn missing_default_file_is_fine_explicit_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        assert!(matches!(
            load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
    }
}
