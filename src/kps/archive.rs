//! Unpacking a KPS batch-export zip in memory, with hard limits, and telling which entry is
//! which key.
//!
//! The zip's inner layout is not documented, so it is read tolerantly:
//! - entries are matched to the requested names by base name, without the folder and without
//!   an extension (`demo2.pem`, `keypairs/demo2.pem`, `demo2`, `demo2.txt`, `demo2.pub` all
//!   mean `demo2`);
//! - each entry's content is read with the `keys` module: a private key is a key to write, a
//!   public key (a `.pub` entry) only checks the private key of its name, and anything else
//!   (a readme, a manifest) is ignored, at debug level;
//! - a private key whose entry name matches no requested name is matched by its public key
//!   against the KPS listing; with no listing, or no single match, the zip is refused;
//! - a requested name with no usable entry is a [`Gap`]: the caller exports it on its own.
//!
//! Everything else that could be surprising refuses the whole archive ([`ArchiveError`]), and
//! every hard limit is a refusal, whatever the entry: size, count, inflation ratio, `..`,
//! absolute paths, links and special files, encryption, zip64.
//!
//! Invariants:
//! - Nothing touches the filesystem: the archive is read from a byte slice and entry names are
//!   only ever compared, never used as paths.
//! - A refused archive yields no key at all.
//! - Memory stays bounded by [`Limits`]: the entry count is checked from the end-of-central-
//!   directory record before the zip crate allocates for it, declared sizes are checked before
//!   anything is inflated, and inflation itself stops one byte past the limit (headers lie).
//! - Key bytes live only in zeroizing buffers, from the inflater to the returned keys.
//! - Errors name the requested keys and the entry (escaped, so a hostile name cannot forge log
//!   lines), never any entry's contents.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::{self, Cursor, Read};

use zeroize::Zeroizing;
use zip::read::ZipFile;
use zip::{CompressionMethod, ZipArchive};

use crate::keys::{PrivateKey, PublicKey, Verified};
use crate::kps::KeypairInfo;

/// The KPS listing by name, when the pass has one.
pub type Listing = BTreeMap<String, KeypairInfo>;

/// The signature every zip starts with (a local file header).
const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";
const EOCD_SIGNATURE: &[u8; 4] = b"PK\x05\x06";
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_SIGNATURE: &[u8; 4] = b"PK\x06\x07";
const ZIP64_LOCATOR_LEN: usize = 20;
const CENTRAL_HEADER_SIGNATURE: &[u8; 4] = b"PK\x01\x02";
const CENTRAL_HEADER_LEN: usize = 46;

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Hard limits on what one archive may cost. The defaults are generous for up to ten SSH keys
/// (an RSA-4096 PEM is about 3.3 KiB) and small enough that a hostile response costs little.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The compressed archive as received.
    pub max_zip_bytes: usize,
    /// Entries in the central directory, directories included.
    pub max_entries: usize,
    /// One entry, inflated.
    pub max_entry_bytes: u64,
    /// All entries together, inflated.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_zip_bytes: 4 * 1024 * 1024,
            max_entries: 32,
            max_entry_bytes: 64 * 1024,
            max_total_bytes: 1024 * 1024,
        }
    }
}

/// What an archive held for the requested names.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// Key name -> its parsed private key.
    pub keys: BTreeMap<String, PrivateKey>,
    /// Requested names the archive has no usable key for: the caller fetches them with the
    /// single export call.
    pub gaps: Vec<(String, Gap)>,
}

/// Why a requested name got no key from an archive that was otherwise used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// No entry for the name.
    Missing,
    /// The name's entry is not a private key kps-sync accepts (an error page, a passphrase).
    NotAKey,
}

/// An entry name as received, shown quoted and escaped, and cut short: it comes from the
/// network and must not be able to inject lines or terminal escapes into a log.
#[derive(Clone, PartialEq, Eq)]
pub struct EntryName(pub String);

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 120;
        f.write_str("'")?;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_CHARS {
                f.write_str("...")?;
                break;
            }
            write!(f, "{}", c.escape_debug())?;
        }
        f.write_str("'")
    }
}

impl fmt::Debug for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The requested key names, for messages.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyList(pub Vec<String>);

impl fmt::Display for KeyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl fmt::Debug for KeyList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// " (key NAME)" when the entry maps to a requested key, else nothing.
struct ForKey<'a>(&'a Option<String>);

/// "entry NAME is" or "the zip is", for [`Problem::Corrupt`].
struct Damaged<'a>(&'a Option<EntryName>);

impl fmt::Display for Damaged<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(entry) => write!(f, "entry {entry} is"),
            None => f.write_str("the zip is"),
        }
    }
}

impl fmt::Display for ForKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => write!(f, " (key {key})"),
            None => Ok(()),
        }
    }
}

/// Why an archive was refused. `key` is the requested key the entry maps to, where it maps to
/// one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The response is larger than `max_zip_bytes`.
    #[error("the zip is {size} bytes, over the limit of {limit} bytes")]
    ZipTooLarge { size: usize, limit: usize },
    /// The response does not start with `PK\x03\x04`.
    #[error("the response does not start with the zip signature")]
    NotAZip,
    /// The zip structure or an entry's data is damaged.
    #[error("{} damaged ({detail})", Damaged(.entry))]
    Corrupt {
        entry: Option<EntryName>,
        detail: String,
    },
    /// A zip64 archive: never needed for a handful of small keys.
    #[error("the zip uses the zip64 format")]
    Zip64,
    /// More central-directory entries than `max_entries`.
    #[error("the zip has {count} entries, over the limit of {limit}")]
    TooManyEntries { count: usize, limit: usize },
    /// A `..` component.
    #[error("entry {entry}{} escapes its folder with '..'", ForKey(.key))]
    Traversal {
        entry: EntryName,
        key: Option<String>,
    },
    /// A leading `/` or `\`, or a drive letter.
    #[error("entry {entry}{} has an absolute path", ForKey(.key))]
    AbsolutePath {
        entry: EntryName,
        key: Option<String>,
    },
    /// A symbolic link (unix mode `S_IFLNK`).
    #[error("entry {entry}{} is a symbolic link", ForKey(.key))]
    Symlink {
        entry: EntryName,
        key: Option<String>,
    },
    /// A device, fifo, socket, or a directory posing as a file.
    #[error("entry {entry}{} is not a regular file (unix mode {mode:o})", ForKey(.key))]
    NotRegularFile {
        entry: EntryName,
        key: Option<String>,
        mode: u32,
    },
    /// A private key whose entry name matches no requested key, and whose public key does not
    /// match exactly one of them in the listing (`listed`: whether there was a listing).
    #[error(
        "entry {entry} holds a private key {}",
        if *.listed {
            "that matches none of the requested keys, by name or by public key in the KPS listing"
        } else {
            "whose name matches none of the requested keys (and there is no KPS listing to \
             match it by public key)"
        }
    )]
    Unmatched { entry: EntryName, listed: bool },
    /// A public key entry that is not the public half of its name's private key.
    #[error("public key entry {entry} is not the public half of the private key for {key}")]
    PublicMismatch { entry: EntryName, key: String },
    /// A private key entry named after a key that KPS lists with another public key.
    #[error("entry {entry} holds a private key other than the one KPS lists for {key}")]
    ListedMismatch { entry: EntryName, key: String },
    /// Two entries for one key (or two entries with the very same name).
    #[error(
        "{}{}",
        if .first == .second {
            format!("two entries are named {first}")
        } else {
            format!("entries {first} and {second} are both for one key")
        },
        ForKey(.key)
    )]
    Duplicate {
        key: Option<String>,
        first: EntryName,
        second: EntryName,
    },
    /// An encrypted entry.
    #[error("entry {entry}{} is encrypted", ForKey(.key))]
    Encrypted {
        entry: EntryName,
        key: Option<String>,
    },
    /// A compression method other than stored or deflate.
    #[error(
        "entry {entry}{} uses compression {method} (only stored and deflate are read)",
        ForKey(.key)
    )]
    UnsupportedCompression {
        entry: EntryName,
        key: Option<String>,
        method: String,
    },
    /// An entry larger than `max_entry_bytes`, by its header (`declared`) or once inflated.
    #[error(
        "entry {entry}{} {} over the limit of {limit} bytes",
        ForKey(.key),
        if *.declared { "declares a size" } else { "inflates to" }
    )]
    EntryTooLarge {
        entry: EntryName,
        key: Option<String>,
        declared: bool,
        limit: u64,
    },
    /// All entries together larger than `max_total_bytes`.
    #[error(
        "at entry {entry}{} the entries {} over the total limit of {limit} bytes",
        ForKey(.key),
        if *.declared { "declare sizes" } else { "inflate to" }
    )]
    TotalTooLarge {
        entry: EntryName,
        key: Option<String>,
        declared: bool,
        limit: u64,
    },
}

impl Problem {
    /// A structurally damaged response (truncated, or not a zip at all) rather than one built to
    /// do harm: worth trying again on the next pass.
    fn is_damage(&self) -> bool {
        matches!(self, Problem::NotAZip | Problem::Corrupt { .. })
    }

    /// A well-formed archive that uses a feature we chose not to read.
    fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Problem::Zip64 | Problem::UnsupportedCompression { .. }
        )
    }
}

/// The archive from one batch export was refused as a whole; nothing from it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveError {
    /// The names the batch asked for: every one of them is affected.
    pub keys: KeyList,
    pub problem: Problem,
}

impl ArchiveError {
    /// True when the response looks damaged in transit (not a zip, truncated, bad checksum)
    /// rather than built to do harm: the next pass may well succeed.
    pub fn is_transient(&self) -> bool {
        self.problem.is_damage()
    }
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing the archive from KPS for keys {}: {}; ",
            self.keys, self.problem
        )?;
        if self.problem.is_damage() {
            f.write_str(
                "the response was damaged or did not come from KPS: check for a proxy or captive \
                 portal between this host and the KPS endpoint; the next pass tries again",
            )
        } else if self.problem.is_unsupported() {
            f.write_str(
                "KPS may have changed its export format: report it with this message and the \
                 kps-sync version",
            )
        } else {
            f.write_str(
                "this is not a response KPS should send: report it and check for a proxy in the \
                 path",
            )
        }
    }
}

impl std::error::Error for ArchiveError {}

/// Unpack the batch-export `zip` for the `requested` key names within `limits`; `listing`
/// matches private keys whose entry names say nothing, and checks the named ones.
///
/// A requested name without a usable key is a gap; every other surprise, and every limit,
/// refuses the whole archive.
pub fn unpack(
    zip: &[u8],
    requested: &[String],
    listing: Option<&Listing>,
    limits: &Limits,
) -> Result<Unpacked, ArchiveError> {
    let fail = |problem| ArchiveError {
        keys: KeyList(requested.to_vec()),
        problem,
    };
    let wanted: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
    let mut archive = open(zip, limits, &wanted).map_err(fail)?;
    let planned = check_headers(&mut archive, limits, &wanted).map_err(fail)?;
    let inflated = inflate(&mut archive, planned, limits).map_err(fail)?;
    let sorted = sort(inflated).map_err(fail)?;
    explain(sorted, requested, listing).map_err(fail)
}

/// Check the envelope (size, signature, end record, entry count, same-name entries) and open
/// the archive.
fn open<'z>(
    zip: &'z [u8],
    limits: &Limits,
    wanted: &BTreeSet<&str>,
) -> Result<ZipArchive<Cursor<&'z [u8]>>, Problem> {
    if zip.len() > limits.max_zip_bytes {
        return Err(Problem::ZipTooLarge {
            size: zip.len(),
            limit: limits.max_zip_bytes,
        });
    }
    // An archive with no entries at all is only its end record; every name is then missing.
    if !zip.starts_with(ZIP_MAGIC) && !zip.starts_with(EOCD_SIGNATURE) {
        return Err(Problem::NotAZip);
    }
    // Before the zip crate sizes anything by the entry count, and because it silently keeps
    // only the last of two entries with the same name.
    let count = precheck_central_directory(zip, limits.max_entries, wanted)?;
    let archive = ZipArchive::new(Cursor::new(zip)).map_err(|e| Problem::Corrupt {
        entry: None,
        detail: e.to_string(),
    })?;
    if archive.len() != count {
        return Err(Problem::Corrupt {
            entry: None,
            detail: format!(
                "the central directory lists {count} entries but {} could be read",
                archive.len()
            ),
        });
    }
    Ok(archive)
}

/// An entry that passed the header checks, to be inflated.
struct Planned {
    index: usize,
    entry: EntryName,
    /// The requested key its name stands for, if any.
    key: Option<String>,
    declared: u64,
}

/// Pass 1: headers only. A hostile archive is refused before anything is inflated.
fn check_headers(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    limits: &Limits,
    wanted: &BTreeSet<&str>,
) -> Result<Vec<Planned>, Problem> {
    let mut planned = Vec::new();
    let mut declared_total: u64 = 0;
    for index in 0..archive.len() {
        let listed = archive
            .name_for_index(index)
            .map(|n| EntryName(n.to_owned()));
        let file = archive.by_index_raw(index).map_err(|e| Problem::Corrupt {
            entry: listed,
            detail: e.to_string(),
        })?;
        let Some(entry) = check_entry(&file, index, limits, wanted)? else {
            continue;
        };
        declared_total = declared_total.saturating_add(entry.declared);
        if declared_total > limits.max_total_bytes {
            return Err(Problem::TotalTooLarge {
                entry: entry.entry,
                key: entry.key,
                declared: true,
                limit: limits.max_total_bytes,
            });
        }
        planned.push(entry);
    }
    Ok(planned)
}

/// The checks on one entry's headers; `None` for an empty folder entry.
fn check_entry(
    file: &ZipFile<'_, Cursor<&[u8]>>,
    index: usize,
    limits: &Limits,
    wanted: &BTreeSet<&str>,
) -> Result<Option<Planned>, Problem> {
    let name = file.name();
    let entry = EntryName(name.to_owned());
    let key = match_key(name, wanted);
    match check_path(name) {
        Err(PathProblem::Traversal) => return Err(Problem::Traversal { entry, key }),
        Err(PathProblem::Absolute) => return Err(Problem::AbsolutePath { entry, key }),
        Ok(()) => {}
    }
    let file_type = file.unix_mode().map(|mode| (mode, mode & S_IFMT));
    if let Some((_, S_IFLNK)) = file_type {
        return Err(Problem::Symlink { entry, key });
    }
    if name.ends_with('/') || name.ends_with('\\') {
        // Writers disagree on the mode bits of a folder; its name and emptiness are what
        // make it one.
        if file.size() == 0 && file.compressed_size() <= 2 {
            return Ok(None);
        }
        let mode = file_type.map_or(0, |(mode, _)| mode);
        return Err(Problem::NotRegularFile { entry, key, mode });
    }
    if let Some((mode, kind)) = file_type
        && kind != 0
        && kind != S_IFREG
    {
        return Err(Problem::NotRegularFile { entry, key, mode });
    }
    if file.encrypted() {
        return Err(Problem::Encrypted { entry, key });
    }
    match file.compression() {
        CompressionMethod::Stored | CompressionMethod::Deflated => {}
        other => {
            let method = format!("{other:?}");
            return Err(Problem::UnsupportedCompression { entry, key, method });
        }
    }
    let declared = file.size();
    if declared > limits.max_entry_bytes {
        return Err(Problem::EntryTooLarge {
            entry,
            key,
            declared: true,
            limit: limits.max_entry_bytes,
        });
    }
    Ok(Some(Planned {
        index,
        entry,
        key,
        declared,
    }))
}

/// An entry and its inflated bytes.
type Inflated = (Planned, Zeroizing<Vec<u8>>);

/// Pass 2: inflate, enforcing the limits on what actually comes out.
fn inflate(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    planned: Vec<Planned>,
    limits: &Limits,
) -> Result<Vec<Inflated>, Problem> {
    let mut out = Vec::with_capacity(planned.len());
    let mut total: u64 = 0;
    for entry in planned {
        let corrupt = |detail: String| Problem::Corrupt {
            entry: Some(entry.entry.clone()),
            detail,
        };
        let mut file = archive
            .by_index(entry.index)
            .map_err(|e| corrupt(e.to_string()))?;
        let room = limits.max_total_bytes.saturating_sub(total);
        let limit = limits.max_entry_bytes.min(room);
        let (mut buf, len) = read_bounded(&mut file, limit, entry.declared)
            .map_err(|e| corrupt(format!("cannot inflate: {e}")))?;
        drop(file);
        if len as u64 > limit {
            let (entry, key) = (entry.entry, entry.key);
            return Err(if limit == limits.max_entry_bytes {
                Problem::EntryTooLarge {
                    entry,
                    key,
                    declared: false,
                    limit,
                }
            } else {
                Problem::TotalTooLarge {
                    entry,
                    key,
                    declared: false,
                    limit: limits.max_total_bytes,
                }
            });
        }
        if len as u64 != entry.declared {
            let declared = entry.declared;
            return Err(corrupt(format!(
                "it declares {declared} bytes but inflates to {len}"
            )));
        }
        total += len as u64;
        buf.truncate(len);
        out.push((entry, buf));
    }
    Ok(out)
}

/// The entries sorted by what they hold and the name they bear.
#[derive(Default)]
struct Sorted {
    /// Private keys named after a requested key.
    named: BTreeMap<String, (EntryName, PrivateKey)>,
    /// Public keys named after a requested key.
    public: BTreeMap<String, (EntryName, PublicKey)>,
    /// Private keys whose name says nothing.
    strays: Vec<(EntryName, PrivateKey)>,
    /// Requested names whose entry is no key.
    not_keys: BTreeSet<String>,
}

/// Read each entry's content with the keys module and file it.
fn sort(inflated: Vec<Inflated>) -> Result<Sorted, Problem> {
    let mut sorted = Sorted::default();
    for (planned, bytes) in inflated {
        let Planned { entry, key, .. } = planned;
        let private = match PrivateKey::parse(&bytes) {
            Ok(private) => private,
            Err(why) => {
                let public = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|text| PublicKey::parse(text).ok());
                match (public, key) {
                    (Some(public), Some(key)) => {
                        if let Some((first, _)) = sorted.public.get(&key) {
                            let first = first.clone();
                            return Err(duplicate(key, first, entry));
                        }
                        sorted.public.insert(key, (entry, public));
                    }
                    (Some(_), None) => {
                        tracing::debug!(%entry, "zip entry ignored: a public key named after no requested key");
                    }
                    (None, key) => {
                        tracing::debug!(%entry, "zip entry ignored: {why}");
                        sorted.not_keys.extend(key);
                    }
                }
                continue;
            }
        };
        match key {
            Some(key) => {
                if let Some((first, _)) = sorted.named.get(&key) {
                    let first = first.clone();
                    return Err(duplicate(key, first, entry));
                }
                sorted.named.insert(key, (entry, private));
            }
            None => sorted.strays.push((entry, private)),
        }
    }
    Ok(sorted)
}

fn duplicate(key: String, first: EntryName, second: EntryName) -> Problem {
    Problem::Duplicate {
        key: Some(key),
        first,
        second,
    }
}

/// Match the strays by public key, check every key against its `.pub` entry and the listing,
/// and say what is missing.
fn explain(
    sorted: Sorted,
    requested: &[String],
    listing: Option<&Listing>,
) -> Result<Unpacked, Problem> {
    let Sorted {
        mut named,
        public,
        strays,
        not_keys,
    } = sorted;
    for (entry, private) in strays {
        let key = match listing {
            Some(listing) => listed_owner(&private, requested, listing),
            None => None,
        };
        let Some(key) = key else {
            let listed = listing.is_some();
            return Err(Problem::Unmatched { entry, listed });
        };
        if let Some((first, _)) = named.get(&key) {
            let first = first.clone();
            return Err(duplicate(key, first, entry));
        }
        tracing::debug!(%entry, key = %key, "zip entry matched by its public key in the listing");
        named.insert(key, (entry, private));
    }
    for (key, (entry, public)) in public {
        if named.get(&key).is_some_and(|(_, p)| p.public() != &public) {
            return Err(Problem::PublicMismatch { entry, key });
        }
    }
    if let Some(listing) = listing {
        for (key, (entry, private)) in &named {
            if let Some(info) = listing.get(key)
                && verify(private, info).is_err()
            {
                let (entry, key) = (entry.clone(), key.clone());
                return Err(Problem::ListedMismatch { entry, key });
            }
        }
    }
    let mut keys = BTreeMap::new();
    for (key, (_, private)) in named {
        keys.insert(key, private);
    }
    let gaps = requested
        .iter()
        .filter(|name| !keys.contains_key(name.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|name| {
            let gap = if not_keys.contains(name) {
                Gap::NotAKey
            } else {
                Gap::Missing
            };
            (name.clone(), gap)
        })
        .collect();
    Ok(Unpacked { keys, gaps })
}

fn verify(private: &PrivateKey, info: &KeypairInfo) -> Result<Verified, crate::keys::KeyError> {
    private.verify_listed(info.public_key.as_deref(), info.fingerprint.as_deref())
}

/// The one requested name the listing shows with this key's public key or fingerprint.
fn listed_owner(private: &PrivateKey, requested: &[String], listing: &Listing) -> Option<String> {
    let mut owners = requested.iter().filter(|name| {
        listing.get(name.as_str()).is_some_and(|info| {
            matches!(
                verify(private, info),
                Ok(Verified::PublicKey | Verified::Fingerprint)
            )
        })
    });
    let owner = owners.next()?;
    owners.next().is_none().then(|| owner.clone())
}

/// Read at most `limit + 1` bytes into a zeroizing buffer; returns it and how much was read.
///
/// The buffer grows by copying into a fresh zeroizing allocation, never by `Vec` reallocation,
/// so no stale copy of key bytes is left behind in freed memory.
fn read_bounded(
    reader: &mut impl Read,
    limit: u64,
    declared: u64,
) -> io::Result<(Zeroizing<Vec<u8>>, usize)> {
    let cap = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX);
    let mut limited = reader.take(limit.saturating_add(1));
    // declared + 1 so an honest entry is read in one allocation and EOF is seen without growing.
    let initial = usize::try_from(declared.saturating_add(1))
        .unwrap_or(usize::MAX)
        .clamp(1, cap);
    let mut buf = Zeroizing::new(vec![0u8; initial]);
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= cap {
                break;
            }
            let grown = buf.len().saturating_mul(2).max(4096).min(cap);
            let mut bigger = Zeroizing::new(vec![0u8; grown]);
            bigger[..filled].copy_from_slice(&buf[..filled]);
            buf = bigger;
        }
        match limited.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((buf, filled))
}

enum PathProblem {
    Traversal,
    Absolute,
}

/// Refuse names that would escape a folder if anything ever used them as paths. Both `/` and
/// `\` count as separators: zips made on Windows use either.
fn check_path(name: &str) -> Result<(), PathProblem> {
    let bytes = name.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if name.starts_with(['/', '\\']) || drive {
        return Err(PathProblem::Absolute);
    }
    if name.split(['/', '\\']).any(|part| part == "..") {
        return Err(PathProblem::Traversal);
    }
    Ok(())
}

/// The requested key an entry name stands for: its base name, or the base name without its
/// extension (`.pub` counts as one more: `demo2.pem.pub` is `demo2`'s too).
fn match_key(name: &str, wanted: &BTreeSet<&str>) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let base = match base.strip_suffix(".pub") {
        Some(stem) if !stem.is_empty() && !wanted.contains(base) => stem,
        _ => base,
    };
    if wanted.contains(base) {
        return Some(base.to_owned());
    }
    let stem = match base.rfind('.') {
        Some(dot) if dot > 0 => &base[..dot],
        _ => base,
    };
    wanted.contains(stem).then(|| stem.to_owned())
}

fn u16_at(bytes: &[u8], at: usize) -> Option<usize> {
    let b = bytes.get(at..at + 2)?;
    Some(u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Read the end-of-central-directory record and walk the central directory: refuse too many
/// entries before anything is allocated for them, refuse zip64, and find two entries with the
/// very same name (the zip crate keeps only one of them). Returns the entry count.
fn precheck_central_directory(
    zip: &[u8],
    max_entries: usize,
    wanted: &BTreeSet<&str>,
) -> Result<usize, Problem> {
    let corrupt = |detail: &str| Problem::Corrupt {
        entry: None,
        detail: detail.to_owned(),
    };
    if zip.len() < EOCD_LEN {
        return Err(corrupt("too short to be a zip"));
    }
    // The record is the last thing in the file, followed only by its comment (at most 64 KiB).
    let last = zip.len() - EOCD_LEN;
    let first = last.saturating_sub(u16::MAX as usize);
    let eocd = (first..=last)
        .rev()
        .find(|&at| {
            &zip[at..at + 4] == EOCD_SIGNATURE
                && u16_at(zip, at + 20).is_some_and(|comment| at + EOCD_LEN + comment == zip.len())
        })
        .ok_or_else(|| corrupt("no end-of-central-directory record"))?;
    let entries = u16_at(zip, eocd + 10).unwrap_or(0);
    let dir_offset = u32_at(zip, eocd + 16).unwrap_or(0);
    let zip64_locator = eocd >= ZIP64_LOCATOR_LEN
        && &zip[eocd - ZIP64_LOCATOR_LEN..eocd - ZIP64_LOCATOR_LEN + 4] == ZIP64_LOCATOR_SIGNATURE;
    if entries == 0xFFFF || dir_offset == u32::MAX || zip64_locator {
        return Err(Problem::Zip64);
    }
    if entries > max_entries {
        return Err(Problem::TooManyEntries {
            count: entries,
            limit: max_entries,
        });
    }
    let mut at = dir_offset as usize;
    let mut names: HashSet<&[u8]> = HashSet::new();
    for _ in 0..entries {
        if zip.get(at..at + 4) != Some(CENTRAL_HEADER_SIGNATURE) {
            return Err(corrupt("the central directory is not where the zip says"));
        }
        let (Some(name_len), Some(extra_len), Some(comment_len)) = (
            u16_at(zip, at + 28),
            u16_at(zip, at + 30),
            u16_at(zip, at + 32),
        ) else {
            return Err(corrupt("truncated central directory"));
        };
        let name_start = at + CENTRAL_HEADER_LEN;
        let name = zip
            .get(name_start..name_start + name_len)
            .ok_or_else(|| corrupt("truncated central directory"))?;
        if !names.insert(name) {
            let shown = EntryName(String::from_utf8_lossy(name).into_owned());
            return Err(Problem::Duplicate {
                key: match_key(&shown.0, wanted),
                first: shown.clone(),
                second: shown,
            });
        }
        at = name_start + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};
    use zip::write::SimpleFileOptions;

    #[test]
    fn problems_read_as_one_sentence_each_whatever_their_variant() {
        let e = || EntryName("k.pem".into());
        let key = Some("k".to_string());
        let cases = [
            (
                Problem::Corrupt {
                    entry: Some(e()),
                    detail: "bad crc".into(),
                },
                "entry 'k.pem' is damaged (bad crc)",
            ),
            (
                Problem::Corrupt {
                    entry: None,
                    detail: "no end record".into(),
                },
                "the zip is damaged (no end record)",
            ),
            (
                Problem::Unmatched {
                    entry: e(),
                    listed: true,
                },
                "entry 'k.pem' holds a private key that matches none of the requested keys, by \
                 name or by public key in the KPS listing",
            ),
            (
                Problem::Unmatched {
                    entry: e(),
                    listed: false,
                },
                "entry 'k.pem' holds a private key whose name matches none of the requested keys \
                 (and there is no KPS listing to match it by public key)",
            ),
            (
                Problem::Duplicate {
                    key: key.clone(),
                    first: e(),
                    second: EntryName("k2.pem".into()),
                },
                "entries 'k.pem' and 'k2.pem' are both for one key (key k)",
            ),
            (
                Problem::Duplicate {
                    key: None,
                    first: e(),
                    second: e(),
                },
                "two entries are named 'k.pem'",
            ),
            (
                Problem::EntryTooLarge {
                    entry: e(),
                    key: key.clone(),
                    declared: true,
                    limit: 10,
                },
                "entry 'k.pem' (key k) declares a size over the limit of 10 bytes",
            ),
            (
                Problem::TotalTooLarge {
                    entry: e(),
                    key: None,
                    declared: false,
                    limit: 10,
                },
                "at entry 'k.pem' the entries inflate to over the total limit of 10 bytes",
            ),
            (
                Problem::NotRegularFile {
                    entry: e(),
                    key,
                    mode: 0o20644,
                },
                "entry 'k.pem' (key k) is not a regular file (unix mode 20644)",
            ),
        ];
        for (problem, text) in cases {
            assert_eq!(problem.to_string(), text);
        }
    }

    const S_IFDIR: u32 = 0o040_000;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A real Ed25519 key in OpenSSH format, one per `id`.
    fn key(id: &[u8]) -> Vec<u8> {
        crate::keys::test_key(id).into_bytes()
    }

    /// The public key line of [`key`]`(id)`.
    fn public(id: &[u8]) -> String {
        PrivateKey::parse(&key(id)).unwrap().public_openssh()
    }

    fn text(got: &Unpacked, name: &str) -> Vec<u8> {
        got.keys[name].normalised().expose().to_vec()
    }

    fn missing(got: &Unpacked) -> Vec<String> {
        got.gaps.iter().map(|(n, _)| n.clone()).collect()
    }

    /// A zip written by the zip crate itself, as a well-behaved server would.
    fn zip_of(entries: &[(&str, &[u8])], method: CompressionMethod) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default().compression_method(method);
        for (name, data) in entries {
            if name.ends_with('/') {
                writer.add_directory(*name, options).unwrap();
            } else {
                writer.start_file(*name, options).unwrap();
                writer.write_all(data).unwrap();
            }
        }
        writer.finish().unwrap().into_inner()
    }

    /// One entry for the hand-written zips: every header field a hostile server controls.
    #[derive(Clone)]
    struct Raw {
        name: Vec<u8>,
        /// Bytes as stored in the archive (already compressed if `method` says so).
        data: Vec<u8>,
        method: u16,
        crc: u32,
        declared: u32,
        flags: u16,
        /// Upper byte of "version made by": 3 = unix.
        system: u8,
        external: u32,
    }

    fn crc(data: &[u8]) -> u32 {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        crc.sum()
    }

    fn stored(name: &str, data: &[u8]) -> Raw {
        Raw {
            name: name.as_bytes().to_vec(),
            data: data.to_vec(),
            method: 0,
            crc: crc(data),
            declared: data.len() as u32,
            flags: 0,
            system: 3,
            external: (S_IFREG | 0o600) << 16,
        }
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn deflated(name: &str, data: &[u8]) -> Raw {
        Raw {
            data: deflate(data),
            method: 8,
            ..stored(name, data)
        }
    }

    /// Local headers, data, central directory and end record, little-endian, no extras.
    fn build(entries: &[Raw]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for e in entries {
            let offset = out.len() as u32;
            out.extend_from_slice(ZIP_MAGIC);
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&e.flags.to_le_bytes());
            out.extend_from_slice(&e.method.to_le_bytes());
            out.extend_from_slice(&[0, 0, 0x21, 0]); // time, date (1980-01-01)
            out.extend_from_slice(&e.crc.to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.declared.to_le_bytes());
            out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&e.name);
            out.extend_from_slice(&e.data);

            central.extend_from_slice(CENTRAL_HEADER_SIGNATURE);
            central.extend_from_slice(&[20, e.system]);
            central.extend_from_slice(&20u16.to_le_bytes());
            central.extend_from_slice(&e.flags.to_le_bytes());
            central.extend_from_slice(&e.method.to_le_bytes());
            central.extend_from_slice(&[0, 0, 0x21, 0]);
            central.extend_from_slice(&e.crc.to_le_bytes());
            central.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            central.extend_from_slice(&e.declared.to_le_bytes());
            central.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 8]); // extra len, comment len, disk, internal attrs
            central.extend_from_slice(&e.external.to_le_bytes());
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(&e.name);
        }
        let dir_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(EOCD_SIGNATURE);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&dir_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn problem(zip: &[u8], requested: &[&str]) -> Problem {
        unpack(zip, &names(requested), None, &Limits::default())
            .expect_err("the archive must be refused")
            .problem
    }

    fn entry(name: &str) -> EntryName {
        EntryName(name.to_owned())
    }

    #[test]
    fn each_layout_maps_entries_to_keys() {
        let (a, b) = (key(b"alpha"), key(b"beta"));
        let layouts: Vec<Vec<(&str, &[u8])>> = vec![
            vec![("a.pem", &a), ("b.pem", &b)],
            vec![("a", &a), ("b", &b)],
            vec![
                ("keypairs/", b""),
                ("keypairs/a.pem", &a),
                ("keypairs/b.pem", &b),
            ],
            vec![("a.txt", &a), ("deep/er/b.key", &b)],
            vec![("keypairs\\a.pem", &a), ("b.pem", &b)],
        ];
        for layout in layouts {
            for method in [CompressionMethod::Stored, CompressionMethod::Deflated] {
                let zip = zip_of(&layout, method);
                let got = unpack(&zip, &names(&["a", "b"]), None, &Limits::default()).unwrap();
                assert_eq!(got.keys.len(), 2, "{layout:?}");
                assert_eq!(text(&got, "a"), a);
                assert_eq!(text(&got, "b"), b);
                assert!(got.gaps.is_empty());
            }
        }
    }

    #[test]
    fn hand_written_stored_and_deflated_entries_are_read() {
        let zip = build(&[stored("a.pem", &key(b"a")), deflated("b.pem", &key(b"b"))]);
        let got = unpack(&zip, &names(&["a", "b"]), None, &Limits::default()).unwrap();
        assert_eq!(text(&got, "a"), key(b"a"));
        assert_eq!(text(&got, "b"), key(b"b"));
    }

    #[test]
    fn requested_names_without_an_entry_are_missing_not_errors() {
        let zip = zip_of(&[("b.pem", &key(b"b"))], CompressionMethod::Deflated);
        let got = unpack(
            &zip,
            &names(&["c", "a", "b", "a"]),
            None,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(got.keys.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(missing(&got), names(&["a", "c"]));
    }

    #[test]
    fn an_empty_archive_leaves_every_name_missing() {
        let zip = zip_of(&[], CompressionMethod::Stored);
        let got = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap();
        assert!(got.keys.is_empty());
        assert_eq!(missing(&got), names(&["a"]));
    }

    #[test]
    fn not_a_zip_is_refused_as_damage() {
        for body in [
            &b"<html><body>502 Bad Gateway</body></html>"[..],
            br#"{"keypair":{"name":"a","private_key":"-----BEGIN"}}"#,
            b"",
            b"PK",
        ] {
            let err = unpack(body, &names(&["a"]), None, &Limits::default()).unwrap_err();
            assert_eq!(err.problem, Problem::NotAZip);
            assert!(err.is_transient());
            let shown = err.to_string();
            assert!(shown.contains("keys a:"), "{shown}");
            assert!(!shown.contains("BEGIN"), "{shown}");
        }
    }

    #[test]
    fn a_zip_over_the_size_limit_is_refused_before_reading() {
        let zip = zip_of(&[("a.pem", &key(b"a"))], CompressionMethod::Stored);
        let limits = Limits {
            max_zip_bytes: zip.len() - 1,
            ..Limits::default()
        };
        let err = unpack(&zip, &names(&["a"]), None, &limits).unwrap_err();
        assert!(matches!(err.problem, Problem::ZipTooLarge { .. }));
    }

    #[test]
    fn traversal_is_refused() {
        for name in ["../a.pem", "keypairs/../../a.pem", "..\\a.pem", "x/.."] {
            let zip = build(&[stored("b.pem", b"b"), stored(name, b"a")]);
            let got = problem(&zip, &["a", "b"]);
            assert!(matches!(got, Problem::Traversal { .. }), "{name}: {got:?}");
        }
        let zip = build(&[stored("../a.pem", b"a")]);
        let err = unpack(&zip, &names(&["a", "b"]), None, &Limits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refusing the archive from KPS for keys a, b: entry '../a.pem' (key a) escapes its \
             folder with '..'; this is not a response KPS should send: report it and check for a \
             proxy in the path"
        );
        assert!(!err.is_transient());
    }

    #[test]
    fn absolute_paths_are_refused() {
        for name in [
            "/etc/a.pem",
            "\\a.pem",
            "C:/a.pem",
            "c:a.pem",
            "//server/a.pem",
        ] {
            let zip = build(&[stored(name, b"a")]);
            let got = problem(&zip, &["a"]);
            assert!(
                matches!(&got, Problem::AbsolutePath { entry: e, .. } if e.0 == name),
                "{name}: {got:?}"
            );
        }
    }

    #[test]
    fn symlink_entries_are_refused() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .add_symlink("a.pem", "/etc/shadow", SimpleFileOptions::default())
            .unwrap();
        let zip = writer.finish().unwrap().into_inner();
        assert_eq!(
            problem(&zip, &["a"]),
            Problem::Symlink {
                entry: entry("a.pem"),
                key: Some("a".into())
            }
        );
    }

    #[test]
    fn special_files_and_directories_posing_as_files_are_refused() {
        let fifo = Raw {
            external: (0o010_000 | 0o600) << 16,
            ..stored("a.pem", b"a")
        };
        let dir = Raw {
            external: (S_IFDIR | 0o700) << 16,
            ..stored("a.pem", b"a")
        };
        let dir_with_data = stored("a/", b"data");
        for raw in [fifo, dir, dir_with_data] {
            let got = problem(&build(&[raw]), &["a"]);
            assert!(matches!(got, Problem::NotRegularFile { .. }), "{got:?}");
        }
    }

    #[test]
    fn dos_attributes_are_fine() {
        let dos = Raw {
            system: 0,
            external: 0x20, // archive bit
            ..stored("a.pem", &key(b"a"))
        };
        let got = unpack(&build(&[dos]), &names(&["a"]), None, &Limits::default()).unwrap();
        assert_eq!(text(&got, "a"), key(b"a"));
    }

    #[test]
    fn encrypted_entries_are_refused() {
        let raw = Raw {
            flags: 1,
            ..stored("a.pem", b"a")
        };
        assert_eq!(
            problem(&build(&[raw]), &["a"]),
            Problem::Encrypted {
                entry: entry("a.pem"),
                key: Some("a".into())
            }
        );
    }

    fn listing(entries: &[(&str, Option<String>, Option<String>)]) -> Listing {
        entries
            .iter()
            .map(|(name, public_key, fingerprint)| {
                let info = KeypairInfo {
                    name: name.to_string(),
                    public_key: public_key.clone(),
                    fingerprint: fingerprint.clone(),
                    is_key_protection: true,
                    frozen_state: None,
                };
                (name.to_string(), info)
            })
            .collect()
    }

    #[test]
    fn unmatched_private_keys_are_refused_without_a_listing() {
        for name in ["c.pem", "README", "a.pem.bak", "A.pem", ".pem"] {
            let zip = build(&[stored("b.pem", &key(b"b")), stored(name, &key(b"x"))]);
            assert_eq!(
                problem(&zip, &["a", "b"]),
                Problem::Unmatched {
                    entry: entry(name),
                    listed: false
                },
                "{name}"
            );
        }
    }

    #[test]
    fn entries_that_are_not_keys_are_ignored() {
        let zip = build(&[
            stored("README.txt", b"These are your key pairs.\r\n"),
            stored("manifest.json", br#"{"keypairs":["a","b"]}"#),
            stored("a.pem", &key(b"a")),
            stored("b.txt", b"<html>502</html>"),
            stored("keypairs/", b""),
        ]);
        let got = unpack(&zip, &names(&["a", "b"]), None, &Limits::default()).unwrap();
        assert_eq!(text(&got, "a"), key(b"a"));
        // b's entry is no key: b is fetched on its own, as not-a-key.
        assert_eq!(got.gaps, vec![("b".to_string(), Gap::NotAKey)]);
    }

    #[test]
    fn pub_entries_check_their_key_and_are_never_keys() {
        let zip = build(&[
            stored("a.pem", &key(b"a")),
            stored("a.pub", public(b"a").as_bytes()),
            stored("b.pem.pub", format!("{} b@kps\n", public(b"b")).as_bytes()),
            stored("b.pem", &key(b"b")),
            stored("other.pub", public(b"x").as_bytes()),
        ]);
        let got = unpack(&zip, &names(&["a", "b", "c"]), None, &Limits::default()).unwrap();
        assert_eq!(text(&got, "a"), key(b"a"));
        assert_eq!(text(&got, "b"), key(b"b"));
        assert_eq!(got.gaps, vec![("c".to_string(), Gap::Missing)]);

        // Only a .pub entry: the public half is never written.
        let zip = build(&[stored("a.pub", public(b"a").as_bytes())]);
        let got = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap();
        assert!(got.keys.is_empty());
        assert_eq!(got.gaps, vec![("a".to_string(), Gap::Missing)]);

        // A .pub entry for another key: the zip cannot be explained.
        let zip = build(&[
            stored("a.pem", &key(b"a")),
            stored("a.pub", public(b"b").as_bytes()),
        ]);
        assert_eq!(
            problem(&zip, &["a"]),
            Problem::PublicMismatch {
                entry: entry("a.pub"),
                key: "a".into()
            }
        );
    }

    #[test]
    fn opaque_names_are_matched_by_public_key_in_the_listing() {
        let zip = build(&[
            stored("key-0001.pem", &key(b"b")),
            stored("README", b"exported keys"),
            stored("key-0002.pem", &key(b"a")),
        ]);
        let md5 = PrivateKey::parse(&key(b"b")).unwrap().fingerprint_md5();
        let listed = listing(&[
            ("a", Some(format!("{} a comment", public(b"a"))), None),
            ("b", None, Some(md5)),
            ("c", Some(public(b"c")), None),
        ]);
        let got = unpack(
            &zip,
            &names(&["a", "b", "c"]),
            Some(&listed),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(text(&got, "a"), key(b"a"));
        assert_eq!(text(&got, "b"), key(b"b"));
        assert_eq!(got.gaps, vec![("c".to_string(), Gap::Missing)]);

        // A key the listing shows for none of the requested names.
        let zip = build(&[stored("key-0001.pem", &key(b"z"))]);
        let err = unpack(&zip, &names(&["a"]), Some(&listed), &Limits::default()).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::Unmatched {
                entry: entry("key-0001.pem"),
                listed: true
            }
        );
        // Matched by the listing to a name that also has a named entry.
        let zip = build(&[
            stored("a.pem", &key(b"a")),
            stored("key-0001.pem", &key(b"a")),
        ]);
        let got = problem_with(&zip, &["a"], &listed);
        assert!(matches!(got, Problem::Duplicate { .. }), "{got:?}");
    }

    #[test]
    fn a_named_key_other_than_the_listed_one_refuses_the_zip() {
        let listed = listing(&[("a", Some(public(b"a")), None)]);
        let zip = build(&[stored("a.pem", &key(b"b"))]);
        assert_eq!(
            problem_with(&zip, &["a"], &listed),
            Problem::ListedMismatch {
                entry: entry("a.pem"),
                key: "a".into()
            }
        );
    }

    #[test]
    fn crlf_and_bom_entries_are_normalised() {
        let crlf = String::from_utf8(key(b"a")).unwrap().replace('\n', "\r\n");
        let bom = format!("\u{feff}{}", String::from_utf8(key(b"b")).unwrap());
        let zip = build(&[
            stored("a.pem", crlf.as_bytes()),
            stored("b.pem", bom.as_bytes()),
        ]);
        let got = unpack(&zip, &names(&["a", "b"]), None, &Limits::default()).unwrap();
        assert_eq!(text(&got, "a"), key(b"a"));
        assert_eq!(text(&got, "b"), key(b"b"));
    }

    fn problem_with(zip: &[u8], requested: &[&str], listed: &Listing) -> Problem {
        unpack(zip, &names(requested), Some(listed), &Limits::default())
            .unwrap_err()
            .problem
    }

    #[test]
    fn two_entries_for_one_key_are_refused() {
        let zip = build(&[
            stored("a.pem", &key(b"1")),
            stored("keypairs/a.txt", &key(b"2")),
        ]);
        assert_eq!(
            problem(&zip, &["a"]),
            Problem::Duplicate {
                key: Some("a".into()),
                first: entry("a.pem"),
                second: entry("keypairs/a.txt")
            }
        );
    }

    #[test]
    fn two_entries_with_the_very_same_name_are_refused() {
        // The zip crate would silently keep only the second one.
        let zip = build(&[stored("a.pem", b"1"), stored("a.pem", b"2")]);
        let err = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::Duplicate {
                key: Some("a".into()),
                first: entry("a.pem"),
                second: entry("a.pem")
            }
        );
        assert!(
            err.to_string()
                .contains("two entries are named 'a.pem' (key a)")
        );
    }

    #[test]
    fn too_many_entries_are_refused_from_the_end_record() {
        let entries: Vec<Raw> = (0..33).map(|i| stored(&format!("d{i}/"), b"")).collect();
        assert_eq!(
            problem(&build(&entries), &["a"]),
            Problem::TooManyEntries {
                count: 33,
                limit: 32
            }
        );
        // A lying end record claiming 65534 entries costs nothing either.
        let mut zip = build(&[stored("a.pem", b"a")]);
        let at = zip.len() - EOCD_LEN;
        zip[at + 8..at + 12].copy_from_slice(&[0xFE, 0xFF, 0xFE, 0xFF]);
        assert!(matches!(
            problem(&zip, &["a"]),
            Problem::TooManyEntries { count: 65534, .. }
        ));
        // Directories count too, but up to the limit they are fine.
        let mut ok: Vec<Raw> = (0..31).map(|i| stored(&format!("d{i}/"), b"")).collect();
        ok.push(stored("a.pem", b"a"));
        assert!(unpack(&build(&ok), &names(&["a"]), None, &Limits::default()).is_ok());
    }

    #[test]
    fn zip64_is_refused() {
        let mut zip = build(&[stored("a.pem", b"a")]);
        let at = zip.len() - EOCD_LEN;
        zip[at + 8..at + 12].copy_from_slice(&[0xFF; 4]);
        assert_eq!(problem(&zip, &["a"]), Problem::Zip64);
    }

    #[test]
    fn declared_sizes_over_the_limits_are_refused_before_inflating() {
        let big = vec![b'k'; 64 * 1024 + 1];
        assert_eq!(
            problem(&build(&[deflated("a.pem", &big)]), &["a"]),
            Problem::EntryTooLarge {
                entry: entry("a.pem"),
                key: Some("a".into()),
                declared: true,
                limit: 64 * 1024
            }
        );
        let limits = Limits {
            max_total_bytes: 100,
            ..Limits::default()
        };
        let zip = build(&[stored("a.pem", &[1; 60]), stored("b.pem", &[2; 60])]);
        let err = unpack(&zip, &names(&["a", "b"]), None, &limits).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::TotalTooLarge {
                entry: entry("b.pem"),
                key: Some("b".into()),
                declared: true,
                limit: 100
            }
        );
    }

    #[test]
    fn an_entry_inflating_past_its_declared_size_is_stopped_at_the_limit() {
        let limits = Limits {
            max_entry_bytes: 1000,
            ..Limits::default()
        };
        let lying = Raw {
            declared: 10,
            ..deflated("a.pem", &[b'x'; 5000])
        };
        let err = unpack(&build(&[lying]), &names(&["a"]), None, &limits).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::EntryTooLarge {
                entry: entry("a.pem"),
                key: Some("a".into()),
                declared: false,
                limit: 1000
            }
        );
        // Within the limit, a size that does not match the header is damage.
        let short = Raw {
            declared: 10,
            ..deflated("a.pem", &[b'x'; 500])
        };
        let got = problem(&build(&[short]), &["a"]);
        assert!(
            matches!(got, Problem::Corrupt { entry: Some(_), .. }),
            "{got:?}"
        );
    }

    #[test]
    fn the_total_is_enforced_while_inflating() {
        let limits = Limits {
            max_entry_bytes: 1000,
            max_total_bytes: 1500,
            ..Limits::default()
        };
        let a = Raw {
            declared: 10,
            ..deflated("a.pem", &[b'x'; 800])
        };
        let zip = build(&[stored("b.pem", &[b'y'; 800]), a]);
        let err = unpack(&zip, &names(&["a", "b"]), None, &limits).unwrap_err();
        assert!(
            matches!(err.problem, Problem::TotalTooLarge { declared: false, ref key, .. } if key.as_deref() == Some("a")),
            "{:?}",
            err.problem
        );
    }

    #[test]
    fn a_real_zip_bomb_is_rejected_quickly() {
        // 100 MiB of zeros deflates to about 100 KiB; its header claims 10 bytes.
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..100 {
            enc.write_all(&chunk).unwrap();
        }
        let bomb = Raw {
            name: b"a.pem".to_vec(),
            data: enc.finish().unwrap(),
            method: 8,
            crc: 0,
            declared: 10,
            flags: 0,
            system: 3,
            external: (S_IFREG | 0o600) << 16,
        };
        let zip = build(&[bomb]);
        assert!(zip.len() < Limits::default().max_zip_bytes);
        let started = Instant::now();
        let err = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap_err();
        let took = started.elapsed();
        assert_eq!(
            err.problem,
            Problem::EntryTooLarge {
                entry: entry("a.pem"),
                key: Some("a".into()),
                declared: false,
                limit: 64 * 1024
            }
        );
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }

    #[test]
    fn unsupported_compression_is_refused() {
        for method in [12u16, 14, 93, 99] {
            let raw = Raw {
                method,
                ..stored("a.pem", b"a")
            };
            let got = problem(&build(&[raw]), &["a"]);
            assert!(
                matches!(
                    got,
                    Problem::UnsupportedCompression { .. } | Problem::Corrupt { .. }
                ),
                "method {method}: {got:?}"
            );
            if method == 12 {
                assert!(matches!(got, Problem::UnsupportedCompression { .. }));
            }
        }
    }

    #[test]
    fn damaged_archives_are_refused_as_damage() {
        let good = build(&[stored("a.pem", &key(b"a")), deflated("b.pem", &key(b"b"))]);
        // Truncated.
        let err = unpack(
            &good[..good.len() - 5],
            &names(&["a", "b"]),
            None,
            &Limits::default(),
        )
        .unwrap_err();
        assert!(err.is_transient(), "{err}");
        // A flipped byte in stored data: the checksum catches it.
        let mut flipped = good.clone();
        flipped[30 + 5 + 3] ^= 0xFF;
        let err = unpack(&flipped, &names(&["a", "b"]), None, &Limits::default()).unwrap_err();
        assert!(
            matches!(err.problem, Problem::Corrupt { entry: Some(ref e), .. } if e.0 == "a.pem"),
            "{:?}",
            err.problem
        );
        // Magic, then garbage.
        let mut junk = ZIP_MAGIC.to_vec();
        junk.extend_from_slice(&[0x55; 200]);
        assert!(matches!(
            problem(&junk, &["a"]),
            Problem::Corrupt { entry: None, .. }
        ));
        // A central directory that points nowhere.
        let mut moved = good.clone();
        let at = moved.len() - EOCD_LEN;
        moved[at + 16..at + 20].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            problem(&moved, &["a"]),
            Problem::Corrupt { entry: None, .. }
        ));
    }

    #[test]
    fn one_hostile_entry_fails_the_whole_archive() {
        let zip = build(&[stored("a.pem", &key(b"a")), stored("../b.pem", &key(b"b"))]);
        assert!(unpack(&zip, &names(&["a", "b"]), None, &Limits::default()).is_err());
    }

    #[test]
    fn unicode_and_odd_names() {
        // A requested name is matched whatever its characters.
        let utf8 = Raw {
            flags: 0x800, // the name is UTF-8
            ..stored("keypairs/ключ-1.pem", &key(b"k"))
        };
        let zip = build(&[utf8]);
        let got = unpack(&zip, &names(&["ключ-1"]), None, &Limits::default()).unwrap();
        assert_eq!(text(&got, "ключ-1"), key(b"k"));

        // Names that could forge log lines or drive a terminal are shown escaped.
        for name in [
            "evil\n2026-01-01 INFO all good.pem",
            "\u{1b}[2Jx.pem",
            "a\u{0}.pem",
        ] {
            let zip = build(&[stored(name, &key(b"x"))]);
            let err = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap_err();
            assert_eq!(
                err.problem,
                Problem::Unmatched {
                    entry: entry(name),
                    listed: false
                }
            );
            let shown = err.to_string();
            assert!(!shown.contains('\n') && !shown.contains('\u{1b}') && !shown.contains('\0'));
            assert!(shown.contains("\\n") || shown.contains("\\u{1b}") || shown.contains("\\0"));
        }

        // Names that are not UTF-8 are shown lossily, still refused.
        let raw = Raw {
            name: vec![0xFF, 0xFE, b'.', b'p'],
            ..stored("x", &key(b"x"))
        };
        assert!(unpack(&build(&[raw]), &names(&["a"]), None, &Limits::default()).is_err());

        // A very long name is cut short in messages.
        let long = format!("{}.pem", "z".repeat(5000));
        let err = unpack(
            &build(&[stored(&long, &key(b"x"))]),
            &names(&["a"]),
            None,
            &Limits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().len() < 600);
    }

    #[test]
    fn errors_never_show_entry_contents() {
        let secret = key(b"c2VjcmV0LWtleS1tYXRlcmlhbA==");
        let cases = [
            build(&[stored("a.pem", &secret), stored("../x.pem", &secret)]),
            build(&[stored("a.pem", &secret), stored("x.pem", &secret)]),
            build(&[Raw {
                declared: 3,
                ..stored("a.pem", &secret)
            }]),
        ];
        for zip in cases {
            let err = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("c2VjcmV0"), "{shown}");
            assert!(!shown.contains("BEGIN"), "{shown}");
        }
    }

    #[test]
    fn unpacked_keys_do_not_show_in_debug() {
        let secret = key(b"a");
        let zip = build(&[stored("a.pem", &secret)]);
        let got = unpack(&zip, &names(&["a"]), None, &Limits::default()).unwrap();
        let shown = format!("{got:?}");
        let body = String::from_utf8(secret)
            .unwrap()
            .lines()
            .nth(2)
            .unwrap()
            .to_string();
        assert!(!shown.contains(&body[..20]), "{shown}");
        assert!(!shown.contains("BEGIN"), "{shown}");
    }
}
