//! `disk init`: create a file-backed A/B disk image, optionally seeded with a factory image.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::bundle::parse_size;
use crate::disk::init::{create_disk_image, BootChain, InitSpec, DEFAULT_ESP_BYTES};
use crate::disk::slots::DiskSpec;
use crate::disk::slots::DEFAULT_LABELS;
use crate::layout::SlotLabels;

/// Disk preparation.
#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create a file-backed A/B disk image (protective MBR, GPT, ROOT-A good, ROOT-B empty).
    Init(InitArgs),
}

/// `disk init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Image file to create (must not exist).
    pub file: PathBuf,
    /// Size of each slot (e.g. 512M, 1G).
    #[arg(long, value_parser = parse_size)]
    pub slot_size: u64,
    /// Total disk size (default: both slots plus 16 MiB spare and GPT).
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// Logical sector size, 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub sector_size: u32,
    /// Slot partition labels, A first.
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = DEFAULT_LABELS.map(String::from))]
    pub labels: Vec<String>,
    /// Partition type GUID of the slots (default: Linux root x86-64).
    #[arg(long, default_value = crate::disk::init::LINUX_ROOT_X86_64)]
    pub type_guid: String,
    /// Factory image: a bundle verified and written into ROOT-A (which stays the good slot).
    #[arg(long, requires = "keyring")]
    pub seed: Option<PathBuf>,
    /// Trusted key file or directory for --seed.
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Add the boot chain for abupdate's UEFI loader: an EFI system partition and a kernel
    /// partition of this size per slot (KERN-A, KERN-B), ChromeOS style.
    #[arg(long, value_parser = parse_size)]
    pub kernel_size: Option<u64>,
    /// Size of the EFI system partition (FAT) [default: 32M].
    #[arg(long, value_parser = parse_size, requires = "kernel_size")]
    pub esp_size: Option<u64>,
    /// The UEFI loader to put on the EFI system partition as \EFI\BOOT\BOOTX64.EFI.
    #[arg(long, requires = "kernel_size")]
    pub efi: Option<PathBuf>,
}

/// Runs a `disk` subcommand.
pub fn run(cmd: DiskCommand) -> Result<()> {
    let DiskCommand::Init(args) = cmd;
    init(args)
}

fn init(args: InitArgs) -> Result<()> {
    let InitArgs {
        file,
        slot_size,
        disk_size,
        sector_size,
        labels,
        type_guid,
        seed,
        keyring,
        kernel_size,
        esp_size,
        efi,
    } = args;
    let labels = SlotLabels::new(labels)?;
    let [a, b] = labels.as_slice() else {
        unreachable!("SlotLabels holds two labels")
    };
    let loader = efi
        .map(|path| {
            std::fs::read(&path).with_context(|| format!("reading the loader {}", path.display()))
        })
        .transpose()?;
    let boot_chain = kernel_size.map(|kernel_size| BootChain {
        esp_size: esp_size.unwrap_or(DEFAULT_ESP_BYTES),
        kernel_size,
        loader,
    });
    let spec = InitSpec {
        slot_size,
        disk_size,
        sector_size,
        labels: [a.clone(), b.clone()],
        type_guid,
        boot_chain,
    };
    create_disk_image(&file, &spec)?;
    println!(
        "created {} ({} bytes): {} and {} of {} bytes each, {} boots next",
        file.display(),
        spec.effective_disk_size().unwrap_or_default(),
        spec.labels[0],
        spec.labels[1],
        slot_size,
        spec.labels[0]
    );
    if let (Some(seed), Some(keyring)) = (seed, keyring) {
        let ring = crate::bundle::Keyring::load(&keyring)?;
        let settings = DiskSpec {
            path: file.clone(),
            sector_size: Some(sector_size),
            labels,
        };
        let seeded = (|| -> Result<()> {
            let mut disk = settings.open_locked()?;
            let source = crate::install::open_bundle_source(&seed)?;
            let written = crate::install::seed_slot(&mut disk, 0, source, &ring, &mut |_| {})?;
            let slot_a = disk.slots()?.remove(0);
            let record = crate::disk::record::read_record(&mut disk.dev, &slot_a, sector_size);
            println!(
                "seeded {} with {} ({:.2} s, verified)",
                spec.labels[0],
                record.map(|r| r.version).unwrap_or_default(),
                written.write_seconds + written.verify_seconds
            );
            Ok(())
        })();
        if seeded.is_err() {
            // A half-made disk is worse than none.
            let _ = std::fs::remove_file(&file);
        }
        seeded?;
    }
    Ok(())
}
