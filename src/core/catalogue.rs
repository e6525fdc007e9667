//! The model catalogue: client-facing models, their aliases and versions (each a name the
//! model servers serve), a default version, a weighted rollout to one other version, and
//! deprecation with a sunset; and the resolution of a call's `model` to one version.
//!
//! Invariants: a name (model, alias or version) belongs to one model of the catalogue; a
//! call resolved here is sent upstream under a version's name; a rollout never picks a
//! version past its sunset; a name the catalogue does not know is left to the upstream's
//! aliases, as before there was a catalogue.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Deserializer, Serialize};

use super::error::GatewayError;
use super::time::UnixTime;

/// Longest name accepted (model, alias, version).
const MAX_NAME_LEN: usize = 256;

/// A model as clients know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    /// The client-facing name; the call log and usage book calls under it.
    pub name: String,
    /// Other names clients may send for the model.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The versions, each a name the model servers serve (the pool routes by it).
    pub versions: Vec<ModelVersion>,
    /// The version a call naming the model gets (unless the rollout picks the other).
    pub default_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub created_at: UnixTime,
    #[serde(default)]
    pub updated_at: UnixTime,
}

/// One version of a model: a served name, and its deprecation if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVersion {
    pub name: String,
    /// Since when (or from when) the version is deprecated: calls get the `Deprecation`
    /// header. Seconds since the epoch, or RFC 3339 on input.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time_input"
    )]
    pub deprecated_at: Option<UnixTime>,
    /// When the version stops being served: calls get the `Sunset` header until then, and
    /// are refused from then on.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time_input"
    )]
    pub sunset_at: Option<UnixTime>,
}

/// A share of the calls naming the model sent to `version` instead of the default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub version: String,
    /// Percent of the calls (0–100).
    pub weight: u8,
}

/// Seconds since the epoch, or an RFC 3339 text (`2027-01-01T00:00:00Z`).
fn time_input<'de, D: Deserializer<'de>>(de: D) -> Result<Option<UnixTime>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum When {
        Unix(UnixTime),
        Text(String),
    }
    match Option::<When>::deserialize(de)? {
        None => Ok(None),
        Some(When::Unix(t)) => Ok(Some(t)),
        Some(When::Text(text)) => humantime::parse_rfc3339_weak(&text)
            .map(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or(0)
            })
            .map(Some)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}`: {e} (use seconds since the epoch or RFC 3339)"
                ))
            }),
    }
}

/// A version's deprecation, as the doors tell it: `Deprecation` and `Sunset` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deprecation {
    pub since: UnixTime,
    pub sunset: Option<UnixTime>,
}

/// What a call's `model` resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The catalogue's name of the model (what the call is booked under).
    pub model: String,
    /// The version sent upstream.
    pub version: String,
    pub deprecation: Option<Deprecation>,
}

impl ModelVersion {
    pub fn is_sunset(&self, now: UnixTime) -> bool {
        self.sunset_at.is_some_and(|s| s <= now)
    }

    fn deprecation(&self) -> Option<Deprecation> {
        self.deprecated_at.map(|since| Deprecation {
            since,
            sunset: self.sunset_at,
        })
    }
}

impl ModelRecord {
    /// Every name of the model: its own, its aliases, its versions.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str())
            .chain(self.aliases.iter().map(String::as_str))
            .chain(self.versions.iter().map(|v| v.name.as_str()))
    }

    pub fn version(&self, name: &str) -> Option<&ModelVersion> {
        self.versions.iter().find(|v| v.name == name)
    }

    /// Checks the record alone: names, versions, default and rollout.
    pub fn validate(&self) -> Result<(), GatewayError> {
        check_name(&self.name, "name")?;
        for alias in &self.aliases {
            check_name(alias, "aliases")?;
        }
        if self.versions.is_empty() {
            return Err(GatewayError::invalid_request(
                format!("model `{}` needs at least one version", self.name),
                Some("versions"),
            ));
        }
        let mut seen = HashSet::new();
        for name in self.names() {
            if !seen.insert(name) {
                return Err(GatewayError::invalid_request(
                    format!(
                        "the name `{name}` is used twice in model `{}` (model, aliases and versions need distinct names)",
                        self.name
                    ),
                    Some("versions"),
                ));
            }
        }
        for version in &self.versions {
            check_name(&version.name, "versions")?;
            match (version.deprecated_at, version.sunset_at) {
                (None, Some(_)) => {
                    return Err(GatewayError::invalid_request(
                        format!(
                            "version `{}` has a sunset but no `deprecated_at`",
                            version.name
                        ),
                        Some("versions"),
                    ));
                }
                (Some(since), Some(sunset)) if sunset < since => {
                    return Err(GatewayError::invalid_request(
                        format!(
                            "version `{}` has its sunset before its deprecation",
                            version.name
                        ),
                        Some("versions"),
                    ));
                }
                _ => {}
            }
        }
        if self.version(&self.default_version).is_none() {
            return Err(GatewayError::invalid_request(
                format!(
                    "`default_version` `{}` is not a version of model `{}`",
                    self.default_version, self.name
                ),
                Some("default_version"),
            ));
        }
        if let Some(rollout) = &self.rollout {
            if rollout.weight > 100 {
                return Err(GatewayError::invalid_request(
                    format!("the rollout's weight is {}: at most 100", rollout.weight),
                    Some("rollout"),
                ));
            }
            if rollout.version == self.default_version {
                return Err(GatewayError::invalid_request(
                    "the rollout's version is the default version: name another",
                    Some("rollout"),
                ));
            }
            if self.version(&rollout.version).is_none() {
                return Err(GatewayError::invalid_request(
                    format!(
                        "the rollout's version `{}` is not a version of model `{}`",
                        rollout.version, self.name
                    ),
                    Some("rollout"),
                ));
            }
        }
        Ok(())
    }

    /// What to tell a caller of a retired version to use: the model (whose default is
    /// served), or its first version still served.
    fn replacement(&self, now: UnixTime) -> Option<String> {
        match self.version(&self.default_version) {
            Some(default) if !default.is_sunset(now) => Some(self.name.clone()),
            _ => self
                .versions
                .iter()
                .find(|v| !v.is_sunset(now))
                .map(|v| v.name.clone()),
        }
    }

    fn resolve(
        &self,
        pinned: Option<usize>,
        now: UnixTime,
        roll: u8,
    ) -> Result<Resolved, GatewayError> {
        let version = match pinned.and_then(|i| self.versions.get(i)) {
            Some(version) => version,
            None => {
                let target = self
                    .rollout
                    .as_ref()
                    .filter(|r| roll < r.weight)
                    .and_then(|r| self.version(&r.version))
                    // A rollout never sends calls to a retired version.
                    .filter(|v| !v.is_sunset(now));
                match target.or_else(|| self.version(&self.default_version)) {
                    Some(version) => version,
                    None => {
                        return Err(GatewayError::ModelNotAllowed {
                            model: self.name.clone(),
                        });
                    }
                }
            }
        };
        if let Some(sunset) = version.sunset_at.filter(|s| *s <= now) {
            return Err(GatewayError::ModelRetired {
                version: version.name.clone(),
                sunset,
                instead: self.replacement(now),
            });
        }
        Ok(Resolved {
            model: self.name.clone(),
            version: version.name.clone(),
            deprecation: version.deprecation(),
        })
    }
}

fn check_name(name: &str, field: &str) -> Result<(), GatewayError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(GatewayError::invalid_request(
            format!("`{name}` is not a model name: 1 to {MAX_NAME_LEN} characters, no spaces"),
            Some(field),
        ));
    }
    Ok(())
}

/// Checks that no name is used by two models of `models`.
pub fn validate_all(models: &[ModelRecord]) -> Result<(), GatewayError> {
    let mut owners: HashMap<&str, &str> = HashMap::new();
    for model in models {
        model.validate()?;
        for name in model.names() {
            if let Some(other) = owners.insert(name, &model.name)
                && other != model.name
            {
                return Err(GatewayError::invalid_request(
                    format!(
                        "the name `{name}` is used by models `{other}` and `{}`",
                        model.name
                    ),
                    Some("name"),
                ));
            }
        }
    }
    Ok(())
}

/// The catalogue as calls read it: each name to its model (and version when pinned).
#[derive(Debug, Default)]
struct Index {
    models: BTreeMap<String, Arc<ModelRecord>>,
    names: HashMap<String, (Arc<ModelRecord>, Option<usize>)>,
}

impl Index {
    fn build(models: impl IntoIterator<Item = ModelRecord>) -> Index {
        let mut index = Index::default();
        for model in models {
            let model = Arc::new(model);
            index
                .names
                .insert(model.name.clone(), (model.clone(), None));
            for alias in &model.aliases {
                index.names.insert(alias.clone(), (model.clone(), None));
            }
            for (i, version) in model.versions.iter().enumerate() {
                index
                    .names
                    .insert(version.name.clone(), (model.clone(), Some(i)));
            }
            index.models.insert(model.name.clone(), model);
        }
        index
    }
}

/// The catalogue held in memory, read by every call; written through to the store by the
/// admin functions, one writer at a time.
#[derive(Debug, Default)]
pub struct Catalogue {
    /// Swapped whole on a change; a call holds the read lock for a clone of the `Arc`.
    index: RwLock<Arc<Index>>,
    /// Whether the catalogue has models: without any, a call reads this one atomic only.
    used: AtomicBool,
    writing: Mutex<()>,
}

impl Catalogue {
    pub fn new(models: Vec<ModelRecord>) -> Catalogue {
        let catalogue = Catalogue::default();
        catalogue.replace(models);
        catalogue
    }

    /// Serves `models` from now on (the store's, after a change).
    pub fn replace(&self, models: Vec<ModelRecord>) {
        let index = Index::build(models);
        let used = !index.models.is_empty();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index);
        self.used.store(used, Ordering::Release);
    }

    /// Held by an admin change from its check against the other models to its write.
    pub fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self) -> Arc<Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The model of exactly this name (not an alias or version).
    pub fn get(&self, name: &str) -> Option<ModelRecord> {
        self.index().models.get(name).map(|m| (**m).clone())
    }

    /// `requested` as the catalogue knows it, `None` for a name it does not know. A pinned
    /// version past its sunset, or a model whose every pick is, is refused.
    pub fn resolve(
        &self,
        requested: &str,
        now: UnixTime,
    ) -> Result<Option<Resolved>, GatewayError> {
        if !self.used.load(Ordering::Acquire) {
            return Ok(None);
        }
        let index = self.index();
        let Some((model, pinned)) = index.names.get(requested) else {
            return Ok(None);
        };
        let roll = match model.rollout {
            Some(_) if pinned.is_none() => roll_percent(),
            _ => 0,
        };
        model.resolve(*pinned, now, roll).map(Some)
    }

    /// The model a name belongs to, if the catalogue knows it.
    pub fn model_of(&self, name: &str) -> Option<Arc<ModelRecord>> {
        if !self.used.load(Ordering::Acquire) {
            return None;
        }
        self.index().names.get(name).map(|(m, _)| m.clone())
    }

    pub fn models(&self) -> Vec<ModelRecord> {
        self.index()
            .models
            .values()
            .map(|m| (**m).clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        !self.used.load(Ordering::Acquire)
    }
}

/// A number in 0..100, uniform, for the rollout's pick (not a secret: the thread's RNG).
fn roll_percent() -> u8 {
    use rand::RngExt;
    rand::rng().random_range(0..100u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(name: &str) -> ModelVersion {
        ModelVersion {
            name: name.into(),
            deprecated_at: None,
            sunset_at: None,
        }
    }

    fn model() -> ModelRecord {
        ModelRecord {
            name: "step3".into(),
            aliases: vec!["step3-latest".into()],
            versions: vec![version("step3-v1"), version("step3-v2")],
            default_version: "step3-v1".into(),
            rollout: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn catalogue(models: Vec<ModelRecord>) -> Catalogue {
        Catalogue::new(models)
    }

    #[test]
    fn a_model_name_or_alias_gets_the_default_and_a_version_name_pins_it() {
        let catalogue = catalogue(vec![model()]);
        let pick = |name| catalogue.resolve(name, 100).unwrap().unwrap();
        assert_eq!(pick("step3").version, "step3-v1");
        assert_eq!(pick("step3-latest").version, "step3-v1");
        assert_eq!(pick("step3-v2").version, "step3-v2");
        assert_eq!(pick("step3-v2").model, "step3");
        assert_eq!(catalogue.resolve("other", 100).unwrap(), None);
    }

    #[test]
    fn the_rollout_picks_by_weight_and_never_a_retired_version() {
        let mut m = model();
        m.rollout = Some(Rollout {
            version: "step3-v2".into(),
            weight: 10,
        });
        assert_eq!(m.resolve(None, 100, 9).unwrap().version, "step3-v2");
        assert_eq!(m.resolve(None, 100, 10).unwrap().version, "step3-v1");
        m.versions[1].deprecated_at = Some(10);
        m.versions[1].sunset_at = Some(50);
        assert_eq!(m.resolve(None, 100, 0).unwrap().version, "step3-v1");
        // Before the sunset, deprecated: picked, with its deprecation.
        let before = m.resolve(None, 20, 0).unwrap();
        assert_eq!(before.version, "step3-v2");
        assert_eq!(
            before.deprecation,
            Some(Deprecation {
                since: 10,
                sunset: Some(50)
            })
        );
    }

    #[test]
    fn a_pinned_version_past_its_sunset_is_refused_naming_what_to_use() {
        let mut m = model();
        m.versions[1].deprecated_at = Some(10);
        m.versions[1].sunset_at = Some(50);
        match m.resolve(Some(1), 50, 0) {
            Err(GatewayError::ModelRetired {
                version,
                sunset,
                instead,
            }) => {
                assert_eq!(version, "step3-v2");
                assert_eq!(sunset, 50);
                assert_eq!(instead.as_deref(), Some("step3"));
            }
            other => panic!("{other:?}"),
        }
        assert!(m.resolve(Some(1), 49, 0).is_ok());
    }

    #[test]
    fn validation_refuses_what_cannot_resolve() {
        let refused = |f: &dyn Fn(&mut ModelRecord)| {
            let mut m = model();
            f(&mut m);
            m.validate().is_err()
        };
        assert!(!refused(&|_| {}));
        assert!(refused(&|m| m.default_version = "nope".into()));
        assert!(refused(&|m| m.versions.clear()));
        assert!(refused(&|m| m.aliases.push("step3-v1".into())));
        assert!(refused(&|m| m.versions.push(version("step3-v1"))));
        assert!(refused(&|m| m.name = "two words".into()));
        assert!(refused(&|m| {
            m.rollout = Some(Rollout {
                version: "step3-v2".into(),
                weight: 101,
            })
        }));
        assert!(refused(&|m| {
            m.rollout = Some(Rollout {
                version: "step3-v1".into(),
                weight: 10,
            })
        }));
        assert!(refused(&|m| {
            m.rollout = Some(Rollout {
                version: "step3-v9".into(),
                weight: 10,
            })
        }));
        assert!(refused(&|m| m.versions[1].sunset_at = Some(5)));
        assert!(refused(&|m| {
            m.versions[1].deprecated_at = Some(10);
            m.versions[1].sunset_at = Some(5);
        }));
    }

    #[test]
    fn a_name_belongs_to_one_model() {
        let mut other = model();
        other.name = "other".into();
        other.aliases.clear();
        other.versions = vec![version("other-v1")];
        other.default_version = "other-v1".into();
        assert!(validate_all(&[model(), other.clone()]).is_ok());
        other.aliases = vec!["step3-v2".into()];
        assert!(validate_all(&[model(), other]).is_err());
    }

    #[test]
    fn times_are_read_as_seconds_or_rfc_3339() {
        let v: ModelVersion = serde_json::from_str(
            r#"{"name":"v","deprecated_at":"2027-01-01T00:00:00Z","sunset_at":1798761600}"#,
        )
        .unwrap();
        assert_eq!(v.deprecated_at, Some(1_798_761_600));
        assert_eq!(v.sunset_at, Some(1_798_761_600));
    }
}
