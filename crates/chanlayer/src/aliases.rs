//! Named layers from a TOML file and the environment, like Django's `CHANNEL_LAYERS`.
//!
//! ```toml
//! [layers.default]
//! url = "memory://"
//! capacity = 200
//! expiry = "30s"
//!
//! [layers.default.channel_capacity]
//! "http.request.*" = 1000
//!
//! [layers.events]
//! url = "kafka://127.0.0.1:9092"
//! codec = "json"
//!
//! [layers.events.backend]          # backend options, as in the URL query
//! "kafka.compression.type" = "lz4"
//! ```
//!
//! Options beside `url` override the same options in the URL's query. The environment
//! variable `CHANLAYER_<ALIAS>_URL` (alias upper-cased, `-` as `_`) replaces an alias's URL
//! or adds the alias; `CHANLAYER_URL` is the `default` alias.

use std::collections::BTreeMap;
use std::path::Path;

use chanlayer_core::{Error, LayerConfig, PartialOptions, Result};
use tokio::sync::Mutex;

use crate::{connect_config, Layer};

/// A set of named layer configurations; [`Layers::get`] connects each once and hands out
/// clones.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let layers = chanlayer::Layers::from_toml_str(r#"
///     [layers.default]
///     url = "memory://"
///     capacity = 5
/// "#).unwrap();
/// let layer = layers.get("default").await.unwrap();
/// assert_eq!(layer.options().capacity, 5);
/// # });
/// ```
pub struct Layers {
    /// Each alias's configuration, or why it could not be built (reported by `get`).
    configs: BTreeMap<String, Result<LayerConfig, String>>,
    connected: Mutex<BTreeMap<String, Layer>>,
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.configs.iter().map(|(k, v)| {
                let shown = match v {
                    Ok(c) => c.to_string(),
                    Err(e) => format!("invalid: {e}"),
                };
                (k, shown)
            }))
            .finish()
    }
}

/// The variable that names `alias`'s URL: `CHANLAYER_<ALIAS>_URL`, `CHANLAYER_URL` for
/// `default`.
fn env_key(alias: &str) -> String {
    if alias == "default" {
        return crate::connect::ENV_URL.to_owned();
    }
    format!(
        "CHANLAYER_{}_URL",
        alias.to_ascii_uppercase().replace('-', "_")
    )
}

/// The URL the environment gives `alias`: `CHANLAYER_<ALIAS>_URL`, and for `default`
/// `CHANLAYER_URL`, which wins over `CHANLAYER_DEFAULT_URL`. Non-UTF-8 values are ignored.
fn env_url(alias: &str) -> Option<String> {
    let own = || std::env::var(format!("CHANLAYER_{}_URL", alias.to_ascii_uppercase())).ok();
    std::env::var(env_key(alias))
        .ok()
        .or_else(|| (alias == "default").then(own).flatten())
}

fn in_alias(alias: &str, e: Error) -> Error {
    match e {
        Error::Config(m) => Error::Config(format!("layer alias {alias:?}: {m}")),
        other => other,
    }
}

fn scalar_to_string(key: &str, v: toml::Value) -> Result<String> {
    match v {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(Error::Config(format!(
            "backend option {key:?} must be a string, number or boolean, not {}",
            other.type_str()
        ))),
    }
}

fn build(
    url: &str,
    partial: PartialOptions,
    backend: BTreeMap<String, String>,
) -> Result<LayerConfig> {
    let mut config = LayerConfig::from_url(url)?;
    config.options.apply(partial)?;
    config.backend.options.0.extend(backend);
    Ok(config)
}

impl Layers {
    /// Parses `[layers.<alias>]` sections, then applies `CHANLAYER_<ALIAS>_URL` overrides.
    pub fn from_toml_str(text: &str) -> Result<Layers> {
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("invalid TOML: {e}")))?;
        let layers = match doc.remove("layers") {
            Some(toml::Value::Table(layers)) => layers,
            Some(_) => return Err(Error::Config("`layers` must be a table of aliases".into())),
            None => {
                let why = "the config file has no [layers.<alias>] section";
                return Err(Error::Config(why.into()));
            }
        };
        let mut configs = BTreeMap::new();
        for (alias, section) in layers {
            let bad =
                |table: &str, why: &str| Error::Config(format!("[layers.{alias}{table}]{why}"));
            let toml::Value::Table(mut section) = section else {
                return Err(bad("", " must be a table"));
            };
            let url = match section.remove("url") {
                Some(toml::Value::String(u)) => u,
                Some(_) => return Err(bad("", " url must be a string")),
                None => return Err(bad("", " has no url")),
            };
            let backend = match section.remove("backend") {
                None => BTreeMap::new(),
                Some(toml::Value::Table(b)) => (b.into_iter())
                    .map(|(k, v)| Ok((k.clone(), scalar_to_string(&k, v)?)))
                    .collect::<Result<_>>()?,
                Some(_) => return Err(bad(".backend", " must be a table")),
            };
            let partial: PartialOptions = toml::Value::Table(section)
                .try_into()
                .map_err(|e| bad("", &format!(": {e}")))?;
            let url = env_url(&alias).unwrap_or(url);
            // A file alias with a bad URL or option is an error now.
            let config = build(&url, partial, backend).map_err(|e| in_alias(&alias, e))?;
            configs.insert(alias, Ok(config));
        }
        Ok(Self::with_env(configs))
    }

    /// Reads a TOML file (see [`Layers::from_toml_str`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Layers> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_str(&text)
    }

    /// Only the environment: `CHANLAYER_URL` as `default`, and every `CHANLAYER_<ALIAS>_URL`.
    pub fn from_env() -> Result<Layers> {
        Ok(Self::with_env(BTreeMap::new()))
    }

    /// The file's aliases `configs` (their URLs already replaced by the environment's), and
    /// the aliases only the environment defines.
    fn with_env(mut configs: BTreeMap<String, Result<LayerConfig, String>>) -> Layers {
        // Aliases that only the environment defines. Their errors wait until they are asked
        // for, so an unrelated bad variable does not break every other alias. Variables that
        // are not UTF-8 are not ours and are skipped.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            let alias = if key == crate::connect::ENV_URL {
                "default".to_owned()
            } else if let Some(a) = key
                .strip_prefix("CHANLAYER_")
                .and_then(|k| k.strip_suffix("_URL"))
                .filter(|a| !a.is_empty())
            {
                a.to_ascii_lowercase()
            } else {
                continue;
            };
            if configs.contains_key(&alias) || configs.keys().any(|a| env_key(a) == key) {
                continue;
            }
            if let Some(url) = env_url(&alias) {
                let built = build(&url, PartialOptions::default(), BTreeMap::new())
                    .map_err(|e| in_alias(&alias, e).to_string());
                configs.insert(alias, built);
            }
        }
        Layers {
            configs,
            connected: Mutex::new(BTreeMap::new()),
        }
    }

    /// The aliases defined.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.configs.keys().map(String::as_str)
    }

    /// The configuration of `alias` (`None` if undefined or invalid; `get` says why).
    pub fn config(&self, alias: &str) -> Option<&LayerConfig> {
        self.configs.get(alias).and_then(|c| c.as_ref().ok())
    }

    /// The layer for `alias`, connected on first use; later calls return a clone of the same
    /// instance.
    pub async fn get(&self, alias: &str) -> Result<Layer> {
        let mut connected = self.connected.lock().await;
        if let Some(l) = connected.get(alias) {
            return Ok(l.clone());
        }
        let config = self.configs.get(alias).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.aliases().collect();
            Error::Config(format!(
                "no layer alias {alias:?}; defined: {}; set {} or add [layers.{alias}] to the config file",
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
                env_key(alias)
            ))
        })?;
        let config = config.map_err(Error::Config)?;
        let layer = connect_config(config).await?;
        connected.insert(alias.to_owned(), layer.clone());
        Ok(layer)
    }
}
