//! Where things are in the manifest text.
//!
//! serde_yaml 0.9 keeps positions to itself: a visitor never sees a mark. It does attach the
//! mark of the innermost node being deserialized to any error a visitor raises. `locate` uses
//! that: it walks the document along a path with a probe that fails on purpose at the target
//! node, and reads the location off the error. It parses the whole text once per call, so it
//! is for the few positions an error needs; `scan_key_lines` finds every key's line under
//! `keys:` in one cheap pass over block-style YAML, and the loader probes only for the keys the
//! scan could not place (flow style, aliases).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::error::Location;

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Seg {
    /// A mapping entry, by its key as text.
    Key(String),
    /// A sequence element.
    Index(usize),
}

/// Which node of the entry at the end of the path to point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Target {
    /// The key of the last mapping entry (`mode` in `mode: "0777"`).
    Key,
    /// The value at the end of the path.
    Value,
}

/// A path built from string keys: `path(&["kps", "auth"])`.
pub(super) fn path(keys: &[&str]) -> Vec<Seg> {
    keys.iter().map(|k| Seg::Key((*k).to_string())).collect()
}

const SENTINEL: &str = "\u{0}kps-sync-probe-hit";

/// The location of the node at `path`, or `None` if there is none (or the text does not parse).
/// With duplicate keys the first occurrence wins.
pub(super) fn locate(text: &str, path: &[Seg], target: Target) -> Option<Location> {
    if target == Target::Key && !matches!(path.last(), Some(Seg::Key(_))) {
        return None;
    }
    let probe = Probe { rest: path, target };
    let err = probe
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()?;
    // serde_yaml puts the dotted path in front of the message.
    if !err.to_string().contains(SENTINEL) {
        return None;
    }
    err.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    })
}

fn hit<E: de::Error>() -> E {
    E::custom(SENTINEL)
}

struct Probe<'p> {
    rest: &'p [Seg],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A node: fail at once if it is the target; walk into it if the path goes on; else skip it.
impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): point at it or skip it.
        if self.rest.is_empty() {
            return Err(hit());
        }
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant::<IgnoredAny>(variant).map(|_| ())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.rest.is_empty() {
            return Err(hit());
        }
        let want = match self.rest[0] {
            Seg::Index(i) => Some(i),
            Seg::Key(_) => None,
        };
        let mut i = 0;
        loop {
            let more = if want == Some(i) {
                seq.next_element_seed(Probe {
                    rest: &self.rest[1..],
                    target: self.target,
                })?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.rest.is_empty() {
            return Err(hit());
        }
        let want = match &self.rest[0] {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        };
        let key_is_target = self.rest.len() == 1 && self.target == Target::Key;
        let mut found = false;
        while let Some(matched) = map.next_key_seed(KeyProbe {
            want: if found { None } else { want },
            fail_on_match: key_is_target,
        })? {
            if matched {
                found = true;
                map.next_value_seed(Probe {
                    rest: &self.rest[1..],
                    target: self.target,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl Probe<'_> {
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        if self.rest.is_empty() {
            Err(hit())
        } else {
            Ok(())
        }
    }
}

/// A mapping key: says whether it is the wanted one, or fails there if the key is the target.
struct KeyProbe<'p> {
    want: Option<&'p str>,
    fail_on_match: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(KeyText(|text: Option<String>| {
            let matched = matches!((self.want, &text), (Some(w), Some(t)) if w == t);
            if matched && self.fail_on_match {
                Err(SENTINEL.to_string())
            } else {
                Ok(matched)
            }
        }))
    }
}

/// Reads a mapping key as the text serde sees (numbers and booleans by `to_string`; `None` for
/// a key that is not a scalar) and hands it to `check` *inside* the visit, so that an error
/// `check` returns is stamped by serde_yaml with the key's own line and column.
pub(super) struct KeyText<F>(pub F);

impl<T, F: FnOnce(Option<String>) -> Result<T, String>> KeyText<F> {
    fn done<E: de::Error>(self, text: Option<String>) -> Result<T, E> {
        (self.0)(text).map_err(E::custom)
    }
}

impl<'de, T, F: FnOnce(Option<String>) -> Result<T, String>> Visitor<'de> for KeyText<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        self.done(Some(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        self.done(Some("null".into()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.done(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.done(None)
    }
}

/// Lines of the entries of the top-level `keys:` mapping, for block-style YAML: the `keys:` line
/// at column 1, then its entries at the first child indentation until the next top-level line.
/// Entries it cannot read (flow style, complex keys) are simply absent; quoted keys with escapes
/// are skipped too, so a name it does return is exactly the YAML key.
pub(super) fn scan_key_lines(text: &str) -> rustc_hash::FxHashMap<&str, Location> {
    let mut found = rustc_hash::FxHashMap::default();
    let mut in_keys = false;
    let mut child_indent: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if indent == 0 {
            if in_keys {
                // A later top-level `keys:` is a duplicate, reported elsewhere.
                break;
            }
            if top_level_key(content) == Some("keys") {
                in_keys = true;
            }
            continue;
        }
        if !in_keys || content.starts_with('\t') {
            continue;
        }
        let d = *child_indent.get_or_insert(indent);
        if indent != d {
            continue;
        }
        if let Some(name) = entry_key(content) {
            found.entry(name).or_insert(Location {
                line: n + 1,
                column: indent + 1,
            });
        }
    }
    found
}

/// `keys:` on a top-level line with nothing but a comment after it.
fn top_level_key(content: &str) -> Option<&str> {
    let key = entry_key(content)?;
    let after = content.split_once(':').map(|(_, a)| a.trim())?;
    (after.is_empty() || after.starts_with('#')).then_some(key)
}

/// The key of a `name: ...` line: plain, or single/double quoted without escapes.
fn entry_key(content: &str) -> Option<&str> {
    let (key, rest) = if let Some(q) = content.strip_prefix('"') {
        let end = q.find('"')?;
        let key = &q[..end];
        if key.contains('\\') {
            return None;
        }
        (key, &q[end + 1..])
    } else if let Some(q) = content.strip_prefix('\'') {
        let end = q.find('\'')?;
        (&q[..end], &q[end + 1..])
    } else {
        let end = content.find(':')?;
        let key = &content[..end];
        if key.is_empty()
            || key.ends_with(' ')
            || key.starts_with(['-', '?', '{', '[', '&', '*', '!', '|', '>', '%', '@', '`'])
            || key.contains(" #")
        {
            return None;
        }
        (key, &content[end..])
    };
    let rest = rest.strip_prefix(':')?;
    (rest.is_empty() || rest.starts_with(' ')).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
version: 1
kps:
  auth:
    token_file: /x
keys:
  a: /a
  b:
    path: /b
    age_recipients:
      - one
      - two
";

    fn loc(line: usize, column: usize) -> Option<Location> {
        Some(Location { line, column })
    }

    #[test]
    fn locate_finds_keys_values_and_sequence_items() {
        assert_eq!(
            locate(DOC, &path(&["kps", "auth", "token_file"]), Target::Key),
            loc(4, 5)
        );
        assert_eq!(
            locate(DOC, &path(&["kps", "auth", "token_file"]), Target::Value),
            loc(4, 17)
        );
        assert_eq!(locate(DOC, &path(&["keys", "b"]), Target::Key), loc(7, 3));
        let mut p = path(&["keys", "b", "age_recipients"]);
        p.push(Seg::Index(1));
        assert_eq!(locate(DOC, &p, Target::Value), loc(11, 9));
    }

    #[test]
    fn locate_returns_none_for_missing_paths() {
        assert_eq!(locate(DOC, &path(&["keys", "zz"]), Target::Key), None);
        assert_eq!(locate(DOC, &path(&["version", "x"]), Target::Value), None);
        // Broken YAML: the probe sees the events before the break, then fails with the parse
        // error, which is not a hit.
        assert_eq!(locate("a: [", &path(&["b"]), Target::Key), None);
        assert_eq!(locate("a: [", &path(&["a"]), Target::Key), loc(1, 1));
    }

    #[test]
    fn locate_works_in_flow_style() {
        let text = "keys: {a: /a, b: {path: /b, mode: \"0777\"}}\n";
        assert_eq!(
            locate(text, &path(&["keys", "b", "mode"]), Target::Value),
            loc(1, 35)
        );
        assert_eq!(locate(text, &path(&["keys", "b"]), Target::Key), loc(1, 15));
    }

    #[test]
    fn scan_finds_block_style_entries_only_under_keys() {
        let text = "\
keys:   # managed
  # comment
  plain: /a
  \"quoted\": /b
  'single':
    path: /c
    nested: x
settings:
  other: 1
";
        let found = scan_key_lines(text);
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found["plain"], Location { line: 3, column: 3 });
        assert_eq!(found["quoted"], Location { line: 4, column: 3 });
        assert_eq!(found["single"], Location { line: 5, column: 3 });
    }

    #[test]
    fn scan_ignores_flow_style() {
        assert!(scan_key_lines("keys: {a: /a}\n").is_empty());
    }
}
