//! Duplicate mapping keys, at any depth.
//!
//! serde_yaml 0.9 keeps the last of two equal keys without a word (its `Value`/`Mapping` too),
//! and serde's derived structs report a duplicate field at the enclosing mapping, not at the
//! key. So before the real parse, one pass visits every key of every mapping: the first repeat
//! fails inside the key's own deserialization, where serde_yaml stamps the key's line and
//! column on the error. The path to the mapping is kept aside so the caller can find the first
//! occurrence with `locate`.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::error::{Location, Problem, raw_error_problem};
use super::locate::{KeyText, Seg, Target, locate};

/// The repeated key and the mapping it is in.
#[derive(Debug)]
struct Duplicate {
    mapping: Vec<Seg>,
    key: String,
}

/// `Ok` when no mapping repeats a key. Otherwise the problem for the second occurrence, naming
/// the line of the first. YAML syntax errors are reported too (this is the first parse).
pub(super) fn check(text: &str) -> Result<(), Problem> {
    let found = RefCell::new(None);
    let node = Node {
        path: Vec::new(),
        found: &found,
    };
    let Err(err) = node.deserialize(serde_yaml::Deserializer::from_str(text)) else {
        return Ok(());
    };
    let Some(dup) = found.into_inner() else {
        return Err(raw_error_problem(&err));
    };
    let location = err.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut first_path = dup.mapping.clone();
    first_path.push(Seg::Key(dup.key.clone()));
    let first = locate(text, &first_path, Target::Key);
    let place = if dup.mapping.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in `{}`", dotted(&dup.mapping))
    };
    let first = match first {
        Some(l) => format!(" (first at line {}, column {})", l.line, l.column),
        None => String::new(),
    };
    Err(Problem {
        location,
        message: format!(
            "duplicate key `{}` {place}{first}: YAML would silently keep only the last one; \
             keep one and delete or rename the other",
            dup.key
        ),
    })
}

fn dotted(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

struct Node<'a> {
    path: Vec<Seg>,
    found: &'a RefCell<Option<Duplicate>>,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node: the tag is not ours to judge here; the real parse rejects it.
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant::<IgnoredAny>(variant).map(|_| ())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            let mut path = self.path.clone();
            path.push(Seg::Index(i));
            let node = Node {
                path,
                found: self.found,
            };
            if seq.next_element_seed(node)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key_seed(Key {
            seen: &mut seen,
            mapping: &self.path,
            found: self.found,
        })? {
            let mut path = self.path.clone();
            // A complex key cannot be named in a path; nothing under it is ours anyway.
            path.push(Seg::Key(key.unwrap_or_else(|| "?".into())));
            map.next_value_seed(Node {
                path,
                found: self.found,
            })?;
        }
        Ok(())
    }
}

struct Key<'a, 'b> {
    seen: &'a mut HashSet<String>,
    mapping: &'a [Seg],
    found: &'b RefCell<Option<Duplicate>>,
}

impl<'de> DeserializeSeed<'de> for Key<'_, '_> {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let Key {
            seen,
            mapping,
            found,
        } = self;
        d.deserialize_any(KeyText(|key: Option<String>| {
            if let Some(k) = &key
                && !seen.insert(k.clone())
            {
                *found.borrow_mut() = Some(Duplicate {
                    mapping: mapping.to_vec(),
                    key: k.clone(),
                });
                return Err(format!("duplicate key `{k}`"));
            }
            Ok(key)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> Problem {
        check(text).expect_err("a duplicate should be found")
    }

    #[test]
    fn no_duplicates_is_ok() {
        check("a: 1\nb:\n  a: 1\n  b: [ {a: 1}, {a: 2} ]\n").unwrap();
    }

    #[test]
    fn duplicate_at_top_level() {
        let p = problem("version: 1\nkeys: {}\nversion: 1\n");
        assert_eq!(p.location, Some(Location { line: 3, column: 1 }));
        assert!(
            p.message
                .contains("duplicate key `version` at the top level"),
            "{}",
            p.message
        );
        assert!(
            p.message.contains("first at line 1, column 1"),
            "{}",
            p.message
        );
    }

    #[test]
    fn duplicate_under_keys() {
        let p = problem("keys:\n  a: /x\n  b: /y\n  a: /z\n");
        assert_eq!(p.location, Some(Location { line: 4, column: 3 }));
        assert!(p.message.contains("`a` in `keys`"), "{}", p.message);
        assert!(
            p.message.contains("first at line 2, column 3"),
            "{}",
            p.message
        );
    }

    #[test]
    fn duplicate_inside_a_key_map() {
        let p = problem("keys:\n  a:\n    path: /x\n    mode: \"0600\"\n    path: /y\n");
        assert_eq!(p.location, Some(Location { line: 5, column: 5 }));
        assert!(p.message.contains("`path` in `keys.a`"), "{}", p.message);
        assert!(
            p.message.contains("first at line 3, column 5"),
            "{}",
            p.message
        );
    }

    #[test]
    fn duplicate_inside_a_sequence_item_in_flow_style() {
        let p = problem("list:\n  - {a: 1, a: 2}\n");
        assert_eq!(
            p.location,
            Some(Location {
                line: 2,
                column: 12
            })
        );
        assert!(p.message.contains("`a` in `list[0]`"), "{}", p.message);
        assert!(
            p.message.contains("first at line 2, column 6"),
            "{}",
            p.message
        );
    }

    #[test]
    fn broken_yaml_is_reported_with_its_location() {
        let p = problem("keys:\n  a: [\n");
        assert!(p.location.is_some(), "{p:?}");
    }
}
