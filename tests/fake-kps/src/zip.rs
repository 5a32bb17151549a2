//! A small zip writer, so the fake controls every byte of the batch-export archive, hostile
//! ones included (lying sizes, symlink attributes, the encryption flag, duplicate names).
//!
//! Invariants: no zip64, no data descriptors, no extra fields; offsets and compressed sizes are
//! always true (a reader must be able to find the data), only `declared_size` may lie. The bomb
//! is built once from a small deflate chunk repeated, so it never costs the fake a gigabyte.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use flate2::{Compress, Compression, FlushCompress};

use crate::{Hostile, Layout, State, Variations};

/// 2026-01-01 00:00:00 in MS-DOS format: a fixed stamp keeps archives reproducible.
const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = ((2026 - 1980) << 9) | (1 << 5) | 1;
const METHOD_STORE: u16 = 0;
const METHOD_DEFLATE: u16 = 8;
const FLAG_ENCRYPTED: u16 = 1;
/// Version made by: MS-DOS host, spec 2.0 (what most writers use for plain files).
const MADE_BY_DOS: u16 = 20;
/// Version made by: Unix host, spec 2.0; readers only honour Unix modes with this.
const MADE_BY_UNIX: u16 = (3 << 8) | 20;

/// One archive member, fully described so hostile variants can be expressed exactly.
pub(crate) struct Entry {
    pub name: Vec<u8>,
    pub method: u16,
    pub flags: u16,
    pub crc: u32,
    /// The bytes as stored (compressed for deflate); shared so the bomb is not copied per entry.
    pub data: Arc<Vec<u8>>,
    /// The uncompressed size written in both headers; may lie.
    pub declared_size: u32,
    pub version_made_by: u16,
    pub external_attrs: u32,
}

impl Entry {
    pub fn deflated(name: &str, content: &[u8]) -> Entry {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        enc.write_all(content)
            .expect("writing to a Vec cannot fail");
        let data = enc.finish().expect("writing to a Vec cannot fail");
        Entry {
            name: name.as_bytes().to_vec(),
            method: METHOD_DEFLATE,
            flags: 0,
            crc: crc32fast::hash(content),
            data: Arc::new(data),
            declared_size: content.len() as u32,
            version_made_by: MADE_BY_DOS,
            external_attrs: 0,
        }
    }

    pub fn stored(name: &str, content: &[u8]) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            method: METHOD_STORE,
            flags: 0,
            crc: crc32fast::hash(content),
            data: Arc::new(content.to_vec()),
            declared_size: content.len() as u32,
            version_made_by: MADE_BY_DOS,
            external_attrs: 0,
        }
    }

    /// A Unix symlink entry: mode `0o120777` in the high half of the external attributes,
    /// the link target as content.
    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry {
            version_made_by: MADE_BY_UNIX,
            external_attrs: 0o120777 << 16,
            ..Entry::stored(name, target.as_bytes())
        }
    }

    /// An entry flagged as (ZipCrypto) encrypted: a 12-byte header and scrambled bytes.
    pub fn encrypted(name: &str, content: &[u8]) -> Entry {
        let data: Vec<u8> = (0..content.len() + 12).map(|_| fastrand::u8(..)).collect();
        Entry {
            flags: FLAG_ENCRYPTED,
            crc: crc32fast::hash(content),
            declared_size: content.len() as u32,
            ..Entry::stored(name, &data)
        }
    }

    /// Deflate data expanding to more than 1 GiB while the headers claim 4 KiB.
    pub fn bomb(name: &str) -> Entry {
        let (data, crc) = bomb_data();
        Entry {
            name: name.as_bytes().to_vec(),
            method: METHOD_DEFLATE,
            flags: 0,
            crc,
            data,
            declared_size: 4096,
            version_made_by: MADE_BY_DOS,
            external_attrs: 0,
        }
    }
}

/// How many MiB of zeros the bomb expands to.
pub(crate) const BOMB_MIB: u64 = 1100;

/// A raw deflate stream of `BOMB_MIB` MiB of zeros and its CRC, built once. One MiB of zeros is
/// compressed with a sync flush (byte-aligned, ends a block), that chunk is repeated, and a
/// final empty stored block closes the stream.
fn bomb_data() -> (Arc<Vec<u8>>, u32) {
    static BOMB: OnceLock<(Arc<Vec<u8>>, u32)> = OnceLock::new();
    BOMB.get_or_init(|| {
        let zeros = vec![0u8; 1 << 20];
        let mut c = Compress::new(Compression::best(), false);
        let mut chunk = Vec::with_capacity(8 << 10);
        c.compress_vec(&zeros, &mut chunk, FlushCompress::Sync)
            .expect("deflating into a Vec");
        assert_eq!(c.total_in(), zeros.len() as u64, "chunk buffer too small");
        let mut stream = Vec::with_capacity(chunk.len() * BOMB_MIB as usize + 5);
        let chunk_crc = {
            let mut h = crc32fast::Hasher::new();
            h.update(&zeros);
            h
        };
        let mut crc = crc32fast::Hasher::new();
        for _ in 0..BOMB_MIB {
            stream.extend_from_slice(&chunk);
            crc.combine(&chunk_crc);
        }
        stream.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
        (Arc::new(stream), crc.finalize())
    })
    .clone()
}

/// Serializes entries: local headers and data, central directory, end record.
pub(crate) fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offsets = Vec::with_capacity(entries.len());
    for e in entries {
        offsets.push(out.len() as u32);
        out.extend_from_slice(&0x04034b50u32.to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes()); // version needed
        common_fields(&mut out, e);
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&e.data);
    }
    let cd_start = out.len() as u32;
    for (e, offset) in entries.iter().zip(offsets) {
        out.extend_from_slice(&0x02014b50u32.to_le_bytes());
        out.extend_from_slice(&e.version_made_by.to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes());
        common_fields(&mut out, e);
        out.extend_from_slice(&0u16.to_le_bytes()); // comment length
        out.extend_from_slice(&0u16.to_le_bytes()); // disk number start
        out.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        out.extend_from_slice(&e.external_attrs.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&e.name);
    }
    let cd_size = out.len() as u32 - cd_start;
    let count = u16::try_from(entries.len()).expect("no zip64: at most 65535 entries");
    out.extend_from_slice(&0x06054b50u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // this disk
    out.extend_from_slice(&0u16.to_le_bytes()); // disk with the central directory
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_start.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment length
    out
}

/// Flags through extra-field length: identical in local and central headers.
fn common_fields(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(&e.flags.to_le_bytes());
    out.extend_from_slice(&e.method.to_le_bytes());
    out.extend_from_slice(&DOS_TIME.to_le_bytes());
    out.extend_from_slice(&DOS_DATE.to_le_bytes());
    out.extend_from_slice(&e.crc.to_le_bytes());
    out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
    out.extend_from_slice(&e.declared_size.to_le_bytes());
    out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // extra field length
}

/// What a `NotZip` batch export answers with a 200.
pub(crate) const NOT_ZIP_BODY: &[u8] =
    b"<html><body><h1>Service maintenance</h1><p>Please try again later.</p></body></html>\n";

/// The batch-export body for `keys` (name, private key text) as the fake's state says: its
/// layout, hostile variant and [`Variations`].
pub(crate) fn varied_batch(s: &State, keys: &[(&str, &str)], omit: Option<&str>) -> Vec<u8> {
    let v = &s.variations;
    let texts: Vec<String> = keys.iter().map(|(_, text)| v.text(text)).collect();
    let keys: Vec<(&str, &str)> = keys
        .iter()
        .zip(&texts)
        .map(|((name, _), text)| (*name, text.as_str()))
        .collect();
    let Some(mut entries) = entries(&keys, s.layout, s.hostile, omit) else {
        return NOT_ZIP_BODY.to_vec();
    };
    vary(&mut entries, s, &keys, v);
    write(&entries)
}

/// `.pub` entries, a stray entry and opaque names, as `v` asks.
fn vary(entries: &mut Vec<Entry>, s: &State, keys: &[(&str, &str)], v: &Variations) {
    if v.pub_entries {
        for (name, _) in keys {
            let Some(kp) = s.keys.get(*name) else {
                continue;
            };
            let entry = s.layout.entry_name(name);
            let stem = entry.strip_suffix(".pem").unwrap_or(&entry);
            let line = format!("{} {name}\n", kp.public_key_line());
            entries.push(Entry::deflated(&format!("{stem}.pub"), line.as_bytes()));
        }
    }
    if v.opaque_names {
        let count = entries.len();
        for (i, e) in entries.iter_mut().enumerate() {
            let ext = if e.name.ends_with(b".pub") {
                "pub"
            } else {
                "pem"
            };
            e.name = format!("key-{:04}.{ext}", count - i).into_bytes();
        }
        entries.reverse();
    }
    if v.stray_entry {
        let readme = b"Key pairs exported from KPS. Keep them safe.\r\n";
        entries.insert(0, Entry::deflated("README.txt", readme));
    }
}

/// The batch-export body for `keys` (name, private key text), in request order.
/// Hostile variants change the first requested key's entry (or the last, for `MissingName`)
/// and leave the others as the layout says.
#[cfg(test)]
pub(crate) fn batch(
    keys: &[(&str, &str)],
    layout: Layout,
    hostile: Option<Hostile>,
    omit: Option<&str>,
) -> Vec<u8> {
    match entries(keys, layout, hostile, omit) {
        Some(entries) => write(&entries),
        None => NOT_ZIP_BODY.to_vec(),
    }
}

/// The entries of a batch zip; `None` for `NotZip`.
fn entries(
    keys: &[(&str, &str)],
    layout: Layout,
    hostile: Option<Hostile>,
    omit: Option<&str>,
) -> Option<Vec<Entry>> {
    if hostile == Some(Hostile::NotZip) {
        return None;
    }
    let mut entries: Vec<Entry> = keys
        .iter()
        .filter(|(name, _)| Some(*name) != omit)
        .map(|(name, pem)| Entry::deflated(&layout.entry_name(name), pem.as_bytes()))
        .collect();
    let Some(hostile) = hostile else {
        return Some(entries);
    };
    let (first, first_pem) = keys[0];
    let first_name = layout.entry_name(first);
    let mut replace_first =
        |e: Entry| match entries.iter().position(|x| x.name == first_name.as_bytes()) {
            Some(i) => entries[i] = e,
            None => entries.insert(0, e),
        };
    match hostile {
        Hostile::Traversal => replace_first(Entry::deflated(
            &format!("../{first}.pem"),
            first_pem.as_bytes(),
        )),
        Hostile::Absolute => replace_first(Entry::deflated(
            &format!("/etc/{first}.pem"),
            first_pem.as_bytes(),
        )),
        Hostile::Duplicate => {
            let other = crate::sshkey::KeyPair::generate(first);
            let text = other.private_key.expect("generated keys are hosted");
            entries.push(Entry::deflated(&layout.entry_name(first), text.as_bytes()));
        }
        Hostile::Bomb => replace_first(Entry::bomb(&layout.entry_name(first))),
        Hostile::Symlink => replace_first(Entry::symlink(&layout.entry_name(first), "/etc/shadow")),
        Hostile::Encrypted => replace_first(Entry::encrypted(
            &layout.entry_name(first),
            first_pem.as_bytes(),
        )),
        Hostile::Unmatched => {
            let mut stray = String::from("not-requested");
            while keys.iter().any(|(n, _)| *n == stray) {
                stray.push('x');
            }
            let text = crate::sshkey::KeyPair::generate(&stray)
                .private_key
                .unwrap_or_default();
            entries.push(Entry::deflated(&layout.entry_name(&stray), text.as_bytes()));
        }
        Hostile::TooMany => {
            let mut i = 0;
            while entries.len() < 10_000 {
                entries.push(Entry::stored(&format!("filler-{i:05}.txt"), b"x"));
                i += 1;
            }
        }
        Hostile::MissingName => {
            let (last, _) = keys[keys.len() - 1];
            let last_name = layout.entry_name(last);
            entries.retain(|e| e.name != last_name.as_bytes());
        }
        Hostile::NotZip => unreachable!("handled above"),
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read};

    fn open(bytes: Vec<u8>) -> ::zip::ZipArchive<Cursor<Vec<u8>>> {
        ::zip::ZipArchive::new(Cursor::new(bytes)).expect("a standard reader opens it")
    }

    #[test]
    fn round_trips_with_the_zip_crate_for_every_layout() {
        let keys = [("kp-a", "alpha key text\n"), ("kp_b", "beta key text\n")];
        for (layout, names) in [
            (Layout::Pem, ["kp-a.pem", "kp_b.pem"]),
            (Layout::Bare, ["kp-a", "kp_b"]),
            (Layout::Folder, ["keypairs/kp-a.pem", "keypairs/kp_b.pem"]),
            (Layout::Txt, ["kp-a.txt", "kp_b.txt"]),
        ] {
            let bytes = batch(&keys, layout, None, None);
            assert_eq!(&bytes[..4], b"PK\x03\x04");
            let mut z = open(bytes);
            assert_eq!(z.len(), 2);
            for (i, (_, text)) in keys.iter().enumerate() {
                let mut f = z.by_index(i).unwrap();
                assert_eq!(f.name(), names[i]);
                assert_eq!(f.compression(), ::zip::CompressionMethod::Deflated);
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                assert_eq!(s, *text);
            }
        }
    }

    fn names_in(bytes: Vec<u8>) -> Vec<String> {
        let z = open(bytes);
        z.file_names().map(str::to_string).collect::<Vec<_>>()
    }

    #[test]
    fn each_variation_changes_the_zip_as_documented() {
        let mut s = crate::State::new();
        for name in ["a", "b"] {
            s.keys
                .insert(name.into(), crate::sshkey::KeyPair::generate(name));
        }
        let texts: Vec<String> = ["a", "b"]
            .iter()
            .map(|n| s.keys[*n].private_key.clone().unwrap())
            .collect();
        let keys = [("a", texts[0].as_str()), ("b", texts[1].as_str())];
        let mut names = names_in(varied_batch(&s, &keys, None));
        names.sort();
        assert_eq!(names, ["a.pem", "b.pem"]);

        s.variations.pub_entries = true;
        let bytes = varied_batch(&s, &keys, None);
        let mut z = open(bytes);
        let mut line = String::new();
        z.by_name("a.pub")
            .unwrap()
            .read_to_string(&mut line)
            .unwrap();
        assert_eq!(line, format!("{} a\n", s.keys["a"].public_key_line()));
        assert_eq!(z.len(), 4);

        s.variations = crate::Variations {
            stray_entry: true,
            opaque_names: true,
            ..Default::default()
        };
        assert_eq!(
            names_in(varied_batch(&s, &keys, None)),
            ["README.txt", "key-0001.pem", "key-0002.pem"]
        );
        // Reverse order: key-0001 is b's.
        let mut z = open(varied_batch(&s, &keys, None));
        let mut text = String::new();
        z.by_name("key-0001.pem")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, texts[1]);

        s.variations = crate::Variations {
            crlf: true,
            bom: true,
            ..Default::default()
        };
        let mut z = open(varied_batch(&s, &keys, None));
        let mut text = String::new();
        z.by_name("a.pem")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.starts_with("\u{feff}-----BEGIN"));
        assert_eq!(text.matches("\r\n").count(), texts[0].matches('\n').count());
        assert_eq!(
            text.replace("\r\n", "\n").trim_start_matches('\u{feff}'),
            texts[0]
        );
    }

    #[test]
    fn omitted_and_missing_names_have_no_entry() {
        let keys = [("a", "A"), ("b", "B"), ("c", "C")];
        let z = open(batch(&keys, Layout::Pem, None, Some("b")));
        assert_eq!(z.file_names().collect::<Vec<_>>().len(), 2);
        assert!(z.index_for_name("b.pem").is_none());
        let z = open(batch(&keys, Layout::Pem, Some(Hostile::MissingName), None));
        assert!(z.index_for_name("c.pem").is_none());
        assert_eq!(z.len(), 2);
    }

    #[test]
    fn hostile_names_and_attributes() {
        let keys = [("a", "A"), ("b", "B")];
        let mut z = open(batch(&keys, Layout::Pem, Some(Hostile::Traversal), None));
        assert_eq!(z.by_index(0).unwrap().name(), "../a.pem");
        assert_eq!(z.by_index(1).unwrap().name(), "b.pem");
        let mut z = open(batch(&keys, Layout::Pem, Some(Hostile::Absolute), None));
        assert_eq!(z.by_index(0).unwrap().name(), "/etc/a.pem");
        let mut z = open(batch(&keys, Layout::Pem, Some(Hostile::Symlink), None));
        let f = z.by_index(0).unwrap();
        assert!(f.is_symlink());
        assert_eq!(f.unix_mode(), Some(0o120777));
        drop(f);
        let mut z = open(batch(&keys, Layout::Pem, Some(Hostile::Encrypted), None));
        assert!(z.by_index(0).is_err(), "encrypted entries need a password");
        let z = open(batch(&keys, Layout::Pem, Some(Hostile::Unmatched), None));
        assert_eq!(z.len(), 3);
        assert!(z.index_for_name("not-requested.pem").is_some());
        let z = open(batch(&keys, Layout::Pem, Some(Hostile::TooMany), None));
        assert_eq!(z.len(), 10_000);
        assert_eq!(
            batch(&keys, Layout::Pem, Some(Hostile::NotZip), None),
            NOT_ZIP_BODY
        );
    }

    #[test]
    fn duplicate_has_two_entries_for_one_name() {
        let bytes = batch(
            &[("a", "A"), ("b", "B")],
            Layout::Pem,
            Some(Hostile::Duplicate),
            None,
        );
        // Count central directory records naming a.pem: the zip crate may keep only one.
        let needle = b"a.pem";
        let cd_hits = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"PK\x01\x02")
            .filter(|(i, _)| &bytes[i + 46..i + 46 + needle.len()] == needle)
            .count();
        assert_eq!(cd_hits, 2);
    }

    #[test]
    fn bomb_is_small_lies_about_its_size_and_expands_past_a_gib() {
        let bytes = batch(&[("a", "A")], Layout::Pem, Some(Hostile::Bomb), None);
        assert!(
            bytes.len() < 4 << 20,
            "the bomb zip is {} bytes",
            bytes.len()
        );
        let mut z = open(bytes);
        let f = z.by_index(0).unwrap();
        assert_eq!(f.size(), 4096, "the header lies");
        // Inflate the whole thing, counting only: this is what a client must never do.
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut f = f;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert!(total > 1 << 30);
        assert_eq!(total, BOMB_MIB << 20);
    }
}
