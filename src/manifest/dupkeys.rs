//! Duplicate mapping keys, refused in the one parse that builds the raw manifest.
//!
//! serde_yaml 0.9 keeps the last of two equal keys without a word, and serde's derived structs
//! report a duplicate field at the enclosing mapping, not at the key. So every mapping of the
//! raw manifest is read through [`UniqueKeys`]: each key is first read as text, inside the key's
//! own deserialization, where serde_yaml stamps the key's line and column on an error; a repeat
//! fails there, and the text is then handed to the real key (a struct's field name, a key pair
//! name). [`problem`] turns that error into the manifest's message, naming the first occurrence.
//!
//! Cost: nothing beyond the parse itself (one set of key texts per mapping); the first
//! occurrence is located with one more parse only when a duplicate was found.

use std::fmt;
use std::marker::PhantomData;

use rustc_hash::FxHashSet;
use serde::de::value::{MapAccessDeserializer, StringDeserializer};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::error::{Problem, raw_error_problem};
use super::locate::{KeyText, Seg, Target, locate};

/// What the duplicate error says, for [`problem`] to recognise.
const MARK: &str = "duplicate key `";

/// A mapping's entries, failing on the first repeated key.
pub(super) struct UniqueKeys<A> {
    map: A,
    seen: FxHashSet<String>,
}

impl<A> UniqueKeys<A> {
    pub fn new(map: A) -> Self {
        UniqueKeys {
            map,
            seen: FxHashSet::default(),
        }
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for UniqueKeys<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.map.next_key_seed(KeySeed {
            inner: seed,
            seen: &mut self.seen,
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

struct KeySeed<'a, K> {
    inner: K,
    seen: &'a mut FxHashSet<String>,
}

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<'_, K> {
    type Value = K::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<K::Value, D::Error> {
        let KeySeed { inner, seen } = self;
        // Everything happens inside `deserialize_any`, so that serde_yaml stamps the key's own
        // line and column on any error: a repeat here, an unknown field in `inner`.
        d.deserialize_any(KeyText(|key: Option<String>| match key {
            None => Err("a key must be plain text, not a list or a mapping".to_string()),
            Some(k) if !seen.insert(k.clone()) => Err(format!("{MARK}{k}`")),
            Some(k) => inner
                .deserialize(StringDeserializer::<de::value::Error>::new(k))
                .map_err(|e| e.to_string()),
        }))
    }
}

/// `T` read from a mapping whose keys must be unique. `T` sees an ordinary mapping.
pub(super) struct Unique<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Unique<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(UniqueKeys::new(map)))
            }
        }
        d.deserialize_map(V(PhantomData)).map(Unique)
    }
}

/// For `#[serde(default, deserialize_with = "unique")]` on an optional mapping field.
pub(super) fn unique<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Unique<T>>::deserialize(d)?.map(|u| u.0))
}

/// The manifest's problem for a parse error, when it is a duplicate key: located at the
/// repeat, naming the mapping and the line and column of the first occurrence.
pub(super) fn problem(err: &serde_yaml::Error, text: &str) -> Option<Problem> {
    let raw = raw_error_problem(err);
    let (mapping, rest) = match raw.message.split_once(": ") {
        Some((p, r)) if !p.contains(' ') && r.starts_with(MARK) => (p, r),
        _ if raw.message.starts_with(MARK) => ("", raw.message.as_str()),
        _ => return None,
    };
    let key = rest.strip_prefix(MARK)?.strip_suffix('`')?;
    let mut path = segments(mapping);
    let place = if path.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in `{mapping}`")
    };
    path.push(Seg::Key(key.to_string()));
    let first = match locate(text, &path, Target::Key) {
        Some(l) => format!(" (first at line {}, column {})", l.line, l.column),
        None => String::new(),
    };
    Some(Problem {
        location: raw.location,
        message: format!(
            "duplicate key `{key}` {place}{first}: YAML would silently keep only the last one; \
             keep one and delete or rename the other"
        ),
    })
}

/// serde_yaml's dotted path (`keys.a`, `list[0]`) as segments.
fn segments(dotted: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in dotted.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            out.push(Seg::Key(key.to_string()));
        }
        for index in pieces {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                out.push(Seg::Index(i));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Location;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[serde(default, deserialize_with = "unique")]
        keys: Option<std::collections::BTreeMap<String, serde_yaml::Value>>,
        #[serde(default, deserialize_with = "unique")]
        inner: Option<Inner>,
        version: Option<u32>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        path: Option<String>,
        mode: Option<String>,
    }

    fn parse(text: &str) -> Result<Doc, serde_yaml::Error> {
        Unique::<Doc>::deserialize(serde_yaml::Deserializer::from_str(text)).map(|u| u.0)
    }

    fn problem_of(text: &str) -> Problem {
        let err = parse(text).expect_err("a duplicate should be found");
        problem(&err, text).unwrap_or_else(|| panic!("not a duplicate: {err}"))
    }

    #[test]
    fn no_duplicates_is_ok() {
        let doc = parse("version: 1\nkeys:\n  a: 1\n  b: 2\ninner:\n  path: /x\n").unwrap();
        assert_eq!(doc.version, Some(1));
        assert_eq!(doc.keys.map(|k| k.len()), Some(2));
        let inner = doc.inner.unwrap();
        assert_eq!((inner.path.as_deref(), inner.mode), (Some("/x"), None));
    }

    #[test]
    fn duplicate_at_top_level() {
        let p = problem_of("version: 1\nkeys: {}\nversion: 1\n");
        assert_eq!(p.location, Some(Location { line: 3, column: 1 }));
        assert!(
            p.message
                .contains("duplicate key `version` at the top level (first at line 1, column 1)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn duplicate_under_keys() {
        let p = problem_of("keys:\n  a: /x\n  b: /y\n  a: /z\n");
        assert_eq!(p.location, Some(Location { line: 4, column: 3 }));
        assert!(
            p.message
                .contains("`a` in `keys` (first at line 2, column 3)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn duplicate_inside_a_struct() {
        let p = problem_of("inner:\n  path: /x\n  mode: \"0600\"\n  path: /y\n");
        assert_eq!(p.location, Some(Location { line: 4, column: 3 }));
        assert!(
            p.message
                .contains("`path` in `inner` (first at line 2, column 3)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn unknown_fields_are_still_located_at_their_key() {
        let err = parse("inner:\n  path: /x\n  colour: red\n").unwrap_err();
        assert!(problem(&err, "").is_none());
        let loc = err.location().unwrap();
        assert_eq!((loc.line(), loc.column()), (3, 3), "{err}");
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn segments_read_serde_yaml_paths() {
        assert_eq!(
            segments("keys.a[2].b"),
            vec![
                Seg::Key("keys".into()),
                Seg::Key("a".into()),
                Seg::Index(2),
                Seg::Key("b".into())
            ]
        );
    }
}
