//! Where the device's write cache lives: a layer file in RAM (tmpfs), on a
//! local disk, or in RAM overflowing to a local disk (the type PVS
//! recommends), made fresh at start and gone at exit (a reboot discards it).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use vstream_image::{Disk, Layer};

/// `ram:SIZE`, `disk:PATH:SIZE` or `ram:SIZE,disk:PATH:SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSpec {
    Ram(u64),
    Disk(PathBuf, u64),
    RamThenDisk(u64, PathBuf, u64),
}

impl CacheSpec {
    /// The device's write cache: layers over the lower disk (the base
    /// streamed from the farm), for a disk of `disk_size` bytes whose cache
    /// may hold at most `limit` bytes in all.
    pub fn disk(&self, disk_size: u64, limit: u64) -> Result<Disk> {
        let disk = match self {
            CacheSpec::Ram(s) | CacheSpec::Disk(_, s) => {
                Disk::writable(vec![self.create(disk_size)?], Some((*s).min(limit)))
            }
            CacheSpec::RamThenDisk(ram, path, size) => {
                let ram_layer = CacheSpec::Ram(*ram).create(disk_size)?;
                let disk_layer = CacheSpec::Disk(path.clone(), *size).create(disk_size)?;
                let ram = (*ram).min(limit);
                Disk::with_overflow(vec![], disk_layer, (*size).min(limit - ram), ram_layer, ram)
            }
        };
        Ok(disk
            .map_err(|e| anyhow::anyhow!("the write cache: {e}"))?
            .over_lower())
    }

    /// A new, empty cache layer for a disk of `disk_size` bytes. Its file is
    /// unlinked at once: nothing outlives the agent.
    fn create(&self, disk_size: u64) -> Result<Arc<Layer>> {
        let path = match self {
            CacheSpec::RamThenDisk(..) => bail!("a two-tier cache is made of two layers"),
            CacheSpec::Ram(_) => {
                let dir = PathBuf::from("/dev/shm");
                if !dir.is_dir() {
                    bail!("/dev/shm is missing: a RAM cache needs a tmpfs there");
                }
                dir.join(format!(
                    "vstream-target-{}-{:08x}.cache",
                    std::process::id(),
                    rand::random::<u32>()
                ))
            }
            CacheSpec::Disk(p, _) => {
                if p.symlink_metadata().is_ok() {
                    // The cache of an earlier boot: discarded, as at every
                    // boot. Anything else there is not ours to remove.
                    if !vstream_image::folders::is_layer_file(p) {
                        bail!(
                            "{} exists and is not a vstream write cache: name a new file for disk:PATH",
                            p.display()
                        );
                    }
                    std::fs::remove_file(p)
                        .with_context(|| format!("removing the old write cache {}", p.display()))?;
                }
                p.clone()
            }
        };
        let layer = Layer::create(&path, disk_size)
            .with_context(|| format!("creating the write cache {}", path.display()))?;
        std::fs::remove_file(&path)
            .with_context(|| format!("unlinking the write cache {}", path.display()))?;
        Ok(Arc::new(layer))
    }
}

impl std::fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheSpec::Ram(s) => write!(f, "ram:{s}"),
            CacheSpec::Disk(p, s) => write!(f, "disk:{}:{s}", p.display()),
            CacheSpec::RamThenDisk(r, p, s) => write!(f, "ram:{r},disk:{}:{s}", p.display()),
        }
    }
}

impl std::str::FromStr for CacheSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<CacheSpec, String> {
        let size = |v: &str| vstream_api::parse_size(v);
        if let Some((first, second)) = s.split_once(',') {
            return match (first.parse()?, second.parse()?) {
                (CacheSpec::Ram(r), CacheSpec::Disk(p, d)) => Ok(CacheSpec::RamThenDisk(r, p, d)),
                _ => Err(format!(
                    "--cache {s:?}: two tiers are ram:SIZE,disk:PATH:SIZE, RAM first"
                )),
            };
        }
        if let Some(v) = s.strip_prefix("ram:") {
            return Ok(CacheSpec::Ram(size(v)?));
        }
        if let Some(rest) = s.strip_prefix("disk:") {
            let (path, v) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("--cache {s:?}: expected disk:PATH:SIZE"))?;
            if path.is_empty() {
                return Err(format!("--cache {s:?}: the path is empty"));
            }
            return Ok(CacheSpec::Disk(PathBuf::from(path), size(v)?));
        }
        Err(format!(
            "--cache {s:?}: expected ram:SIZE or disk:PATH:SIZE"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("ram:1GiB".parse(), Ok(CacheSpec::Ram(1 << 30)));
        assert_eq!(
            "disk:/var/cache/v.layer:2GiB".parse(),
            Ok(CacheSpec::Disk("/var/cache/v.layer".into(), 2 << 30))
        );
        assert_eq!(
            "ram:1GiB,disk:/x:2GiB".parse(),
            Ok(CacheSpec::RamThenDisk(1 << 30, "/x".into(), 2 << 30))
        );
        assert!("disk:/x:2GiB,ram:1GiB"
            .parse::<CacheSpec>()
            .unwrap_err()
            .contains("RAM first"));
        assert!("tape:1G".parse::<CacheSpec>().is_err());
        assert!("disk::1G".parse::<CacheSpec>().is_err());
    }

    #[test]
    fn a_cache_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.layer");
        // A file that is not a cache vstream wrote is not removed.
        std::fs::write(&p, b"old").unwrap();
        let e = CacheSpec::Disk(p.clone(), 1 << 20)
            .create(1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a vstream write cache"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        // The cache of an earlier boot (a crash before its unlink) is.
        std::fs::remove_file(&p).unwrap();
        drop(Layer::create(&p, 1 << 20).unwrap());
        let layer = CacheSpec::Disk(p.clone(), 1 << 20).create(1 << 20).unwrap();
        assert_eq!(layer.size(), 1 << 20);
        assert!(!p.exists());
        let two = CacheSpec::RamThenDisk(8192, p.clone(), 1 << 20);
        let disk = two.disk(1 << 20, 1 << 20).unwrap();
        disk.write(&[7u8; 3 * 4096], 0, false).unwrap();
        assert_eq!(disk.top_bytes(), 8192);
        assert_eq!(disk.overflow_bytes(), Some(4096));
        // Both tiers are read; the chunk neither holds is the lower disk's.
        let mut b = [std::mem::MaybeUninit::new(0u8); 4 * 4096];
        let read = disk.read_local(&mut b, 0, false).unwrap();
        assert_eq!(
            read,
            vstream_image::LocalRead::Missing(vec![(3 * 4096, 4096)])
        );
        let held = b[..3 * 4096].iter().all(|x| {
            // SAFETY: read_local wrote every byte outside the missing run.
            unsafe { x.assume_init() == 7 }
        });
        assert!(held);
        assert!(!p.exists());
    }
}
