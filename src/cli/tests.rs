//! Parsing tests: every command parses its documented flags (README.md's CLI reference), and
//! bad usage is a clap error (exit 2). Settings tests: a flag wins over the configuration file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;

use super::bundle::BundleCommand;
use super::channel::ChannelCommand;
use super::disk::DiskCommand;
use super::slot_ops::BootFormat;
use super::{Cli, Command};
use crate::config::{Loaded, RebootPolicy, Strategy};

fn parse(args: &[&str]) -> Command {
    let mut argv = vec!["abupdate"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv) {
        Ok(cli) => cli.command,
        Err(e) => panic!("{args:?} did not parse: {e}"),
    }
}

fn usage_error(args: &[&str]) -> clap::Error {
    let mut argv = vec!["abupdate"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv) {
        Ok(_) => panic!("{args:?} parsed"),
        Err(e) => {
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
            e
        }
    }
}

fn config(text: &str) -> Loaded {
    Loaded {
        config: crate::config::parse(text, Path::new("test.toml")).unwrap(),
        path: Some(PathBuf::from("test.toml")),
    }
}

const FETCH: [&str; 16] = [
    "--retries",
    "3",
    "--retry-delay",
    "500ms",
    "--max-retry-delay",
    "2s",
    "--connect-timeout",
    "5s",
    "--read-timeout",
    "7s",
    "--low-speed-limit",
    "0",
    "--max-redirects",
    "4",
    "--ca-file",
    "ca.pem",
];

#[test]
fn disk_init_parses_its_flags() {
    let Command::Disk(DiskCommand::Init(a)) = parse(&[
        "disk",
        "init",
        "d.img",
        "--slot-size",
        "64M",
        "--disk-size",
        "1G",
        "--sector-size",
        "4096",
        // Two values (the comma form is refused by clap for num_args = 2: unchanged).
        "--labels",
        "SYS-A",
        "SYS-B",
        "--seed",
        "f.bundle",
        "--keyring",
        "keys",
    ]) else {
        panic!("not disk init")
    };
    assert_eq!(a.file, Path::new("d.img"));
    assert_eq!((a.slot_size, a.disk_size), (64 << 20, Some(1 << 30)));
    assert_eq!(a.sector_size, 4096);
    assert_eq!(a.labels, ["SYS-A", "SYS-B"]);
    assert_eq!(a.seed.as_deref(), Some(Path::new("f.bundle")));
    let Command::Disk(DiskCommand::Init(a)) =
        parse(&["disk", "init", "d.img", "--slot-size", "1M"])
    else {
        panic!("not disk init")
    };
    assert_eq!(a.labels, ["ROOT-A", "ROOT-B"]);
    assert_eq!(a.sector_size, 512);
    assert_eq!(a.type_guid, crate::disk::init::LINUX_ROOT_X86_64);
}

#[test]
fn keygen_bundle_and_channel_parse_their_flags() {
    let Command::Keygen(a) = parse(&["keygen", "--out", "release"]) else {
        panic!()
    };
    assert_eq!(a.out, Path::new("release"));
    let Command::Bundle(BundleCommand::Create { chunk_size, .. }) = parse(&[
        "bundle",
        "create",
        "--image",
        "i",
        "--key",
        "k",
        "--version",
        "1.0",
        "--compatible",
        "c",
        "--out",
        "o",
        "--chunk-size",
        "1M",
    ]) else {
        panic!()
    };
    assert_eq!(chunk_size, 1 << 20);
    let Command::Bundle(BundleCommand::Info { keyring, json, .. }) =
        parse(&["bundle", "info", "b", "--keyring", "k", "--json"])
    else {
        panic!()
    };
    assert!(json && keyring.is_some());
    let Command::Bundle(BundleCommand::Verify { pubkey, .. }) =
        parse(&["bundle", "verify", "b", "--pubkey", "k.pub"])
    else {
        panic!()
    };
    assert_eq!(pubkey.as_deref(), Some(Path::new("k.pub")));
    let Command::Channel(ChannelCommand::Create {
        expires_in,
        bundle_url,
        ..
    }) = parse(&[
        "channel",
        "create",
        "--bundle",
        "b",
        "--key",
        "k",
        "--out",
        "index",
        "--bundle-url",
        "b.bundle",
        "--expires-in",
        "7d",
    ])
    else {
        panic!()
    };
    assert_eq!(expires_in, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(bundle_url.as_deref(), Some("b.bundle"));
    let Command::Channel(ChannelCommand::Create { expires_at, .. }) = parse(&[
        "channel",
        "create",
        "--bundle",
        "b",
        "--key",
        "k",
        "--out",
        "i",
        "--expires-at",
        "1970-01-02T00:00:00Z",
    ]) else {
        panic!()
    };
    assert_eq!(expires_at, Some(86400));
}

#[test]
fn install_parses_every_documented_flag() {
    let mut args = vec![
        "install",
        "https://example.com/b.bundle",
        "--disk",
        "d.img",
        "--labels",
        "SYS-A,SYS-B",
        "--sector-size",
        "4096",
        "--keyring",
        "keys",
        "--tries",
        "5",
        "--compatible",
        "board",
        "--allow-downgrade",
        "--running",
        "SYS-A",
        "--adaptive",
        "--dry-run",
        "--sentinel",
        "/run/s",
        "--reboot-policy",
        "none",
        "--json",
    ];
    args.extend(FETCH);
    let Command::Install(a) = parse(&args) else {
        panic!()
    };
    assert_eq!(a.bundle, Path::new("https://example.com/b.bundle"));
    assert_eq!(a.disk.disk.as_deref(), Some(Path::new("d.img")));
    assert_eq!(
        a.disk.labels.as_deref(),
        Some(&["SYS-A".into(), "SYS-B".into()][..])
    );
    assert_eq!(a.disk.sector_size, Some(4096));
    assert_eq!(a.tries, Some(5));
    assert!(a.allow_downgrade && a.adaptive && a.dry_run && a.json);
    assert_eq!(a.reboot.reboot_policy, Some(RebootPolicy::None));
    assert_eq!(a.fetch.retries, Some(3));
    assert_eq!(a.fetch.retry_delay, Some(Duration::from_millis(500)));
    assert_eq!(a.fetch.read_timeout, Some(Duration::from_secs(7)));
    assert_eq!(a.fetch.low_speed_limit, Some(0));
    assert_eq!(a.fetch.max_redirects, Some(4));
    assert_eq!(a.fetch.ca_file.as_deref(), Some(Path::new("ca.pem")));
    let Command::Install(a) = parse(&["install", "-", "--no-sentinel", "--reboot"]) else {
        panic!()
    };
    assert!(a.reboot.no_sentinel && a.reboot.reboot);
}

#[test]
fn check_and_update_parse_their_flags() {
    let mut args = vec![
        "check",
        "--disk",
        "d",
        "--channel",
        "http://a/index",
        "--channel",
        "http://b/index",
        "--keyring",
        "k",
        "--compatible",
        "c",
        "--running",
        "B",
        "--json",
    ];
    args.extend(FETCH);
    let Command::Check(a) = parse(&args) else {
        panic!()
    };
    assert_eq!(a.channel.channels, ["http://a/index", "http://b/index"]);
    assert_eq!(a.channel.running.as_deref(), Some("B"));
    assert!(a.json);
    assert_eq!(a.fetch.connect_timeout, Some(Duration::from_secs(5)));
    let mut args = vec![
        "update",
        "--channel",
        "http://a/index",
        "--strategy",
        "download-only",
        "--cache-dir",
        "/var/c",
        "--tries",
        "2",
        "--adaptive",
        "--sentinel",
        "/run/s",
        "--reboot",
        "--json",
    ];
    args.extend(FETCH);
    let Command::Update(a) = parse(&args) else {
        panic!()
    };
    assert_eq!(a.strategy, Some(Strategy::DownloadOnly));
    assert_eq!(a.cache_dir.as_deref(), Some(Path::new("/var/c")));
    assert_eq!(a.tries, Some(2));
    assert!(a.adaptive && a.reboot.reboot && a.json);
    for s in ["auto", "off"] {
        assert!(matches!(
            parse(&["update", "--strategy", s]),
            Command::Update(_)
        ));
    }
}

#[test]
fn slot_commands_parse_their_flags() {
    let Command::Status(a) = parse(&["status", "--disk", "d", "--running", "A", "--json"]) else {
        panic!()
    };
    assert!(a.json && a.running.as_deref() == Some("A"));
    for (format, want) in [
        ("env", BootFormat::Env),
        ("json", BootFormat::Json),
        ("cmdline", BootFormat::Cmdline),
    ] {
        let Command::Boot(a) = parse(&["boot", "--disk", "d", "--format", format]) else {
            panic!()
        };
        assert_eq!(a.format, want);
    }
    let Command::Boot(a) = parse(&["boot", "--disk", "d"]) else {
        panic!()
    };
    assert_eq!(a.format, BootFormat::Env);
    let Command::Commit(a) = parse(&[
        "commit",
        "--disk",
        "d",
        "--slot",
        "B",
        "--check",
        "true",
        "--check",
        "test -e /",
        "--checks-file",
        "f",
        "--timeout",
        "2m",
        "--reboot",
        "--mark-bad-committed",
        "--force",
        "--json",
    ]) else {
        panic!()
    };
    assert_eq!(a.checks, ["true", "test -e /"]);
    assert_eq!(a.timeout, Some(Duration::from_secs(120)));
    assert!(a.reboot && a.mark_bad_committed && a.force && a.json);
    assert_eq!(a.slot.slot.as_deref(), Some("B"));
    let Command::MarkGood(a) = parse(&["mark-good", "--slot", "A", "--force", "--json"]) else {
        panic!()
    };
    assert!(a.force && a.json && a.slot.slot.is_some());
    let Command::MarkBad(a) = parse(&["mark-bad", "--force"]) else {
        panic!()
    };
    assert!(a.force && a.slot.slot.is_none());
    let Command::Rollback(a) = parse(&["rollback", "--slot", "ROOT-A", "--json"]) else {
        panic!()
    };
    assert_eq!(a.slot.as_deref(), Some("ROOT-A"));
    let Command::SetAttributes(a) = parse(&[
        "set-attributes",
        "--disk",
        "d",
        "--slot",
        "B",
        "--priority",
        "15",
        "--tries",
        "0",
        "--successful",
        "1",
        "--force",
    ]) else {
        panic!()
    };
    assert_eq!(
        (a.priority, a.tries, a.successful),
        (Some(15), Some(0), Some(1))
    );
}

#[test]
fn config_flag_is_global() {
    let cli = Cli::try_parse_from(["abupdate", "status", "--config", "/etc/x.toml"]).unwrap();
    assert_eq!(cli.config.as_deref(), Some(Path::new("/etc/x.toml")));
    let cli = Cli::try_parse_from(["abupdate", "--config", "x.toml", "boot"]).unwrap();
    assert_eq!(cli.config.as_deref(), Some(Path::new("x.toml")));
    assert!(!cli.command.reads_config());
    assert!(parse(&["mark-bad"]).reads_config());
}

#[test]
fn bad_usage_is_a_clap_error_with_exit_2() {
    assert_eq!(
        usage_error(&["no-such-command"]).kind(),
        ErrorKind::InvalidSubcommand
    );
    assert_eq!(
        usage_error(&["install", "b", "--tries", "0"]).kind(),
        ErrorKind::ValueValidation
    );
    usage_error(&["install", "b", "--tries", "16"]);
    usage_error(&["set-attributes", "--slot", "A", "--priority", "16"]);
    usage_error(&["set-attributes", "--slot", "A", "--successful", "2"]);
    assert_eq!(
        usage_error(&["set-attributes", "--priority", "1"]).kind(),
        ErrorKind::MissingRequiredArgument
    );
    usage_error(&["install"]);
    usage_error(&["boot", "--format", "yaml"]);
    usage_error(&["update", "--strategy", "sometimes"]);
    usage_error(&["install", "b", "--retry-delay", "soon"]);
    usage_error(&["disk", "init", "d.img", "--slot-size", "4X"]);
    usage_error(&[
        "disk",
        "init",
        "d.img",
        "--slot-size",
        "1M",
        "--labels",
        "A",
    ]);
    usage_error(&["disk", "init", "d.img", "--slot-size", "1M", "--seed", "b"]);
    usage_error(&["bundle", "verify", "b"]);
    usage_error(&["bundle", "verify", "b", "--keyring", "k", "--pubkey", "p"]);
    usage_error(&[
        "channel",
        "create",
        "--bundle",
        "b",
        "--key",
        "k",
        "--out",
        "o",
        "--expires-in",
        "1d",
        "--expires-at",
        "2027-01-01T00:00:00Z",
    ]);
    usage_error(&["status", "--json=yes"]);
}

#[test]
fn flags_win_over_the_config_file() {
    let cfg = config(
        "disk = \"/dev/cfg\"\nlabels = [\"C-A\", \"C-B\"]\nsector-size = 4096\ntries = 4\nkeyring = \"/cfg/keys\"\nadaptive = true\nreboot = \"none\"\nchannel = [\"http://cfg/index\"]\n[fetch]\nretries = 7\n",
    );
    let Command::Install(a) = parse(&["install", "b", "--disk", "/dev/flag", "--tries", "2"])
    else {
        panic!()
    };
    let s = super::install::InstallSettings::merge(a, &cfg).unwrap();
    assert_eq!(s.disk.path, Path::new("/dev/flag"));
    assert_eq!(s.disk.sector_size, Some(4096));
    assert_eq!(s.disk.labels.as_slice(), ["C-A", "C-B"]);
    assert_eq!(s.options.tries, 2);
    assert!(s.options.adaptive);
    assert_eq!(s.keyring, Path::new("/cfg/keys"));
    assert_eq!(s.reboot.policy, RebootPolicy::None);
    assert_eq!(s.options.sentinel, None);
    assert_eq!(s.fetch.retries, 7);
    let Command::Install(a) = parse(&["install", "b", "--reboot", "--retries", "1"]) else {
        panic!()
    };
    let s = super::install::InstallSettings::merge(a, &cfg).unwrap();
    assert_eq!(s.reboot.policy, RebootPolicy::Now);
    assert_eq!(
        s.options.sentinel.as_deref(),
        Some(Path::new(crate::install::DEFAULT_SENTINEL))
    );
    assert_eq!(s.fetch.retries, 1);
    let Command::Update(a) = parse(&["update", "--channel", "http://flag/index"]) else {
        panic!()
    };
    let s = super::update::UpdateCommandSettings::merge(a, &cfg).unwrap();
    assert_eq!(s.channel.channels, ["http://flag/index"]);
    assert_eq!(s.update.strategy, Strategy::Auto);
    assert_eq!(s.update.tries, 4);
    // Strategy off needs no disk.
    let Command::Update(a) = parse(&["update", "--strategy", "off"]) else {
        panic!()
    };
    let s = super::update::UpdateCommandSettings::merge(a, &Loaded::default()).unwrap();
    assert!(s.disk.is_none());
    // Without a disk anywhere, a command that needs one is a usage error.
    let Command::Status(a) = parse(&["status"]) else {
        panic!()
    };
    let err = a.disk.merge(&Loaded::default()).unwrap_err();
    assert_eq!(super::classify(&err), crate::exit::Exit::Usage);
}

#[test]
fn service_parses_its_flags() {
    let Command::Service(a) = parse(&[
        "service",
        "--disk",
        "d.img",
        "--bus-address",
        "unix:path=/run/test-bus",
        "--keyring",
        "k.pub",
        "--tries",
        "2",
        "--sentinel",
        "none",
    ]) else {
        panic!("not service")
    };
    assert_eq!(a.bus_address.as_deref(), Some("unix:path=/run/test-bus"));
    assert_eq!(a.tries, Some(2));
    assert_eq!(a.sentinel.as_deref(), Some(Path::new("none")));
    assert_eq!(
        usage_error(&["service", "--tries", "0"]).kind(),
        ErrorKind::ValueValidation
    );
}

#[test]
fn boot_and_bundle_create_take_the_boot_chain_flags() {
    let Command::Boot(a) = parse(&["boot", "--disk", "d", "--kernel-cmdline", "/tmp/c"]) else {
        panic!("not boot")
    };
    assert_eq!(a.kernel_cmdline, PathBuf::from("/tmp/c"));
    let Command::Boot(a) = parse(&["boot", "--disk", "d"]) else {
        panic!("not boot")
    };
    assert_eq!(a.kernel_cmdline, PathBuf::from("/proc/cmdline"));
    let Command::Bundle(BundleCommand::Create { kernel, .. }) = parse(&[
        "bundle",
        "create",
        "--image",
        "i",
        "--key",
        "k",
        "--version",
        "1",
        "--compatible",
        "c",
        "--out",
        "o",
        "--kernel",
        "uki.efi",
    ]) else {
        panic!("not bundle create")
    };
    assert_eq!(kernel, Some(PathBuf::from("uki.efi")));
}
