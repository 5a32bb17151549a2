//! The manifest as written: serde structs that mirror the YAML, every mapping
//! `deny_unknown_fields`, every field optional so that missing ones get a message of ours
//! (with a hint) rather than serde's. Nothing here is checked beyond YAML types; `validate`
//! turns these into the model.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::dupkeys::{UniqueKeys, unique};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    /// Any YAML, so that `version: "1"` or `version: 2` gets our message.
    pub version: Option<serde_yaml::Value>,
    #[serde(default, deserialize_with = "unique")]
    pub kps: Option<RawKps>,
    #[serde(default, deserialize_with = "unique")]
    pub defaults: Option<RawDefaults>,
    #[serde(default, deserialize_with = "unique")]
    pub settings: Option<RawSettings>,
    #[serde(default, deserialize_with = "unique")]
    pub keys: Option<BTreeMap<Text, RawKey>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKps {
    pub region: Option<Text>,
    pub endpoint: Option<Text>,
    pub project_id: Option<Text>,
    pub ca_file: Option<Text>,
    #[serde(default, deserialize_with = "unique")]
    pub auth: Option<RawAuth>,
}

/// Inline secrets (`token:`, `password:`...) are not fields: they fail as unknown fields and the
/// error layer turns that into "use `token_file:`".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub token_file: Option<Text>,
    pub access_key_file: Option<Text>,
    pub secret_key_file: Option<Text>,
    pub security_token_file: Option<Text>,
    #[serde(default)]
    pub iam: Present<RawIam>,
    #[serde(default)]
    pub ecs_metadata: Present<RawEcs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIam {
    pub user: Option<Text>,
    pub domain: Option<Text>,
    pub password_file: Option<Text>,
    pub endpoint: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEcs {
    pub endpoint: Option<Text>,
}

/// A sub-mapping whose mere presence matters: `ecs_metadata: {}` and `ecs_metadata:` (null)
/// both select the method.
#[derive(Debug, Default)]
pub(super) enum Present<T> {
    #[default]
    Absent,
    Given(T),
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for Present<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        unique::<D, T>(d).map(|v| Present::Given(v.unwrap_or_default()))
    }
}

impl<T> Present<T> {
    pub fn is_given(&self) -> bool {
        matches!(self, Present::Given(_))
    }
}

/// `defaults:`: every per-key field but `path`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub mode: Option<RawMode>,
    pub owner: Option<Text>,
    pub group: Option<Text>,
    pub age_recipients: Option<Vec<Text>>,
    pub age_recipients_file: Option<Text>,
    pub armor: Option<bool>,
    pub on_change: Option<RawOnChange>,
    pub public_key: Option<RawPublicKey>,
}

/// A key's long form.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeyLong {
    pub path: Option<Text>,
    pub mode: Option<RawMode>,
    pub owner: Option<Text>,
    pub group: Option<Text>,
    pub age_recipients: Option<Vec<Text>>,
    pub age_recipients_file: Option<Text>,
    pub armor: Option<bool>,
    pub on_change: Option<RawOnChange>,
    pub public_key: Option<RawPublicKey>,
}

impl RawKeyLong {
    /// The per-key fields, shaped like `defaults:` so both go through one check.
    pub fn split(self) -> (Option<Text>, RawDefaults) {
        let fields = RawDefaults {
            mode: self.mode,
            owner: self.owner,
            group: self.group,
            age_recipients: self.age_recipients,
            age_recipients_file: self.age_recipients_file,
            armor: self.armor,
            on_change: self.on_change,
            public_key: self.public_key,
        };
        (self.path, fields)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub state_dir: Option<Text>,
    pub interval: Option<Text>,
    pub debounce: Option<Text>,
    pub concurrency: Option<i64>,
    pub prune: Option<bool>,
    pub hook_timeout: Option<Text>,
    pub verify_remote: Option<bool>,
    pub rotation_check: Option<Text>,
    pub watch: Option<Text>,
    pub max_rps: Option<f64>,
    pub metrics_file: Option<Text>,
    pub metrics_listen: Option<Text>,
    pub hook_env: Option<Vec<Text>>,
    pub allow_remote_metrics: Option<bool>,
}

/// An entry of `keys:`: `name: /path` or `name: {path: ..., mode: ...}`.
#[derive(Debug)]
pub(super) enum RawKey {
    Short(Text),
    Long(RawKeyLong),
    /// `name:` with nothing after it.
    Empty,
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path (short form) or a mapping with `path:` (long form)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawKey, E> {
                Ok(RawKey::Short(Text(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawKey, E> {
                Ok(RawKey::Empty)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawKey, A::Error> {
                RawKeyLong::deserialize(de::value::MapAccessDeserializer::new(UniqueKeys::new(map)))
                    .map(RawKey::Long)
            }
        }
        d.deserialize_any(V)
    }
}

/// A file mode as written. Numbers are kept apart to be refused with a hint: YAML readers
/// disagree on whether `0600` is octal, decimal or a string.
#[derive(Debug, Clone)]
pub(super) enum RawMode {
    Text(String),
    Number(String),
}

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quoted octal mode like \"0600\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawMode, E> {
                Ok(RawMode::Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawMode, E> {
                Ok(RawMode::Number(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawMode, E> {
                Ok(RawMode::Number(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawMode, E> {
                Ok(RawMode::Number(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `public_key:` as written: `true`/`false`, or the path of the public key file.
#[derive(Debug, Clone)]
pub(super) enum RawPublicKey {
    Flag(bool),
    Path(Text),
}

impl<'de> Deserialize<'de> for RawPublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPublicKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`true`, `false`, or the path of the public key file")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawPublicKey, E> {
                Ok(RawPublicKey::Flag(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPublicKey, E> {
                Ok(RawPublicKey::Path(Text(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// `on_change:` as written: the argv list, or a plain string to refuse with a hint.
#[derive(Debug, Clone)]
pub(super) enum RawOnChange {
    List(Vec<Text>),
    Plain(String),
}

impl<'de> Deserialize<'de> for RawOnChange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawOnChange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings (argv), like [\"systemctl\", \"reload\", \"nginx\"]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawOnChange, E> {
                Ok(RawOnChange::Plain(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawOnChange, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<Text>()? {
                    argv.push(arg);
                }
                Ok(RawOnChange::List(argv))
            }
        }
        d.deserialize_any(V)
    }
}

/// A scalar read as text. Integers are accepted as their digits (`owner: 0`, a project id of
/// only digits); floats and booleans are refused, since their text would not be what was
/// written (`1e5`, `yes`): quoting fixes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Text(pub String);

impl Text {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string (quote it if YAML reads it as something else)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}
