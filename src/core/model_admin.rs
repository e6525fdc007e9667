//! The catalogue's admin functions for every door (list, get, create, replace, patch,
//! delete), its seeding from the configuration, and the resolution a call asks for: the
//! gate's side of `catalogue`, which holds the models and knows no store.

use serde::{Deserialize, Deserializer};

use super::catalogue::{Catalogue, ModelRecord, ModelVersion, Resolved, Rollout, validate_all};
use super::error::GatewayError;
use super::gateway::Gateway;
use super::shared_limits::Change;
use super::time::now_unix;

/// The meta entry listing the names of the models the configuration ever seeded: a model
/// deleted at runtime is not seeded again at the next start.
const SEEDED_META: &str = "catalogue_seeded";

/// Changes to a model; absent members stay as they are, `rollout: null` ends the rollout.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPatch {
    #[serde(default)]
    pub aliases: Option<Vec<String>>,
    #[serde(default)]
    pub versions: Option<Vec<ModelVersion>>,
    #[serde(default)]
    pub default_version: Option<String>,
    #[serde(default, deserialize_with = "some_or_null")]
    pub rollout: Option<Option<Rollout>>,
}

/// Distinguishes an absent member (`None`) from an explicit `null` (`Some(None)`).
fn some_or_null<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    de: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(de).map(Some)
}

impl Gateway {
    /// What a call's `model` resolves to now; `None` when the catalogue does not know it.
    pub fn resolve_model(&self, requested: &str) -> Result<Option<Resolved>, GatewayError> {
        self.catalogue
            .resolve(requested, now_unix())
            .map_err(|e| self.refused(e))
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    pub fn list_models(&self) -> Vec<ModelRecord> {
        self.catalogue.models()
    }

    pub fn get_model(&self, name: &str) -> Result<ModelRecord, GatewayError> {
        self.catalogue
            .get(name)
            .ok_or_else(|| GatewayError::NotFound {
                what: "model",
                id: name.to_owned(),
            })
    }

    /// Adds a model; a model of that name must not exist yet.
    pub fn create_model(&self, model: ModelRecord) -> Result<ModelRecord, GatewayError> {
        self.write_model(model, Some(false))
    }

    /// Adds a model or replaces the one of its name whole.
    pub fn put_model(&self, model: ModelRecord) -> Result<ModelRecord, GatewayError> {
        self.write_model(model, None)
    }

    pub fn update_model(&self, name: &str, patch: ModelPatch) -> Result<ModelRecord, GatewayError> {
        let mut model = self.get_model(name)?;
        if let Some(aliases) = patch.aliases {
            model.aliases = aliases;
        }
        if let Some(versions) = patch.versions {
            model.versions = versions;
        }
        if let Some(default) = patch.default_version {
            model.default_version = default;
        }
        if let Some(rollout) = patch.rollout {
            model.rollout = rollout;
        }
        self.write_model(model, Some(true))
    }

    pub fn delete_model(&self, name: &str) -> Result<ModelRecord, GatewayError> {
        let _writing = self.catalogue.writing();
        let model = self.get_model(name)?;
        self.store.delete_model(name)?;
        self.catalogue.replace(self.store.load_models()?);
        self.announce(Change::Model(name.to_owned()));
        Ok(model)
    }

    /// Validates `model` against the others and writes it; `exists` says whether a model
    /// of its name must (`Some(true)`), must not (`Some(false)`) or may exist.
    fn write_model(
        &self,
        mut model: ModelRecord,
        exists: Option<bool>,
    ) -> Result<ModelRecord, GatewayError> {
        let _writing = self.catalogue.writing();
        let others = self.catalogue.models();
        let current = others.iter().find(|m| m.name == model.name);
        match (exists, current) {
            (Some(true), None) => {
                return Err(GatewayError::NotFound {
                    what: "model",
                    id: model.name,
                });
            }
            (Some(false), Some(_)) => {
                return Err(GatewayError::invalid_request(
                    format!("model `{}` exists already", model.name),
                    Some("name"),
                ));
            }
            _ => {}
        }
        let now = now_unix();
        model.created_at = current.map_or(now, |c| c.created_at);
        model.updated_at = now;
        model.validate()?;
        if let Some(default) = model.version(&model.default_version)
            && default.is_sunset(now)
        {
            return Err(GatewayError::invalid_request(
                format!(
                    "the default version `{}` is past its sunset: make another version the default",
                    default.name
                ),
                Some("default_version"),
            ));
        }
        let mut all: Vec<ModelRecord> = others
            .iter()
            .filter(|m| m.name != model.name)
            .cloned()
            .collect();
        all.push(model.clone());
        validate_all(&all)?;
        self.store.put_model(&model)?;
        self.catalogue.replace(self.store.load_models()?);
        self.announce(Change::Model(model.name.clone()));
        Ok(model)
    }

    /// Writes the configured models the store does not have and the configuration never
    /// seeded before (a model deleted at runtime stays deleted); runtime changes to a
    /// seeded model are kept.
    pub fn seed_models(&self, configured: &[ModelRecord]) -> Result<usize, GatewayError> {
        if configured.is_empty() {
            return Ok(0);
        }
        validate_all(configured)?;
        let mut seeded: Vec<String> = match self.store.meta(SEEDED_META)? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            None => Vec::new(),
        };
        let mut added = 0;
        for model in configured {
            if seeded.contains(&model.name) {
                continue;
            }
            if self.catalogue.get(&model.name).is_some() {
                seeded.push(model.name.clone());
                continue;
            }
            self.put_model(model.clone())?;
            seeded.push(model.name.clone());
            added += 1;
        }
        let bytes = serde_json::to_vec(&seeded)
            .map_err(|e| GatewayError::Store(format!("cannot write the seeded models: {e}")))?;
        self.store.put_meta(SEEDED_META, &bytes)?;
        Ok(added)
    }

    /// Another replica changed the catalogue: read it again.
    pub(super) fn refresh_catalogue(&self) -> Result<(), GatewayError> {
        let _writing = self.catalogue.writing();
        self.catalogue.replace(self.store.load_models()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::GateSettings;
    use crate::core::testing::{MemoryStore, gate};

    fn model(name: &str, versions: &[&str]) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            aliases: Vec::new(),
            versions: versions
                .iter()
                .map(|v| ModelVersion {
                    name: (*v).into(),
                    deprecated_at: None,
                    sunset_at: None,
                })
                .collect(),
            default_version: versions[0].into(),
            rollout: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn the_configuration_seeds_a_model_once_and_never_over_a_change_or_a_deletion() {
        let (gateway, _queue, _events) = gate(MemoryStore::default(), GateSettings::default());
        let configured = [model("a", &["a-1", "a-2"]), model("b", &["b-1"])];
        assert_eq!(gateway.seed_models(&configured).unwrap(), 2);
        assert_eq!(gateway.seed_models(&configured).unwrap(), 0);
        gateway
            .update_model(
                "a",
                ModelPatch {
                    default_version: Some("a-2".into()),
                    ..ModelPatch::default()
                },
            )
            .unwrap();
        gateway.delete_model("b").unwrap();
        assert_eq!(gateway.seed_models(&configured).unwrap(), 0);
        assert_eq!(gateway.get_model("a").unwrap().default_version, "a-2");
        assert!(gateway.get_model("b").is_err());
        // A model new to the file is seeded.
        let more = [configured[0].clone(), model("c", &["c-1"])];
        assert_eq!(gateway.seed_models(&more).unwrap(), 1);
    }

    #[test]
    fn a_change_that_would_give_a_name_two_models_is_refused_and_changes_nothing() {
        let (gateway, _queue, _events) = gate(MemoryStore::default(), GateSettings::default());
        gateway.create_model(model("a", &["a-1"])).unwrap();
        gateway.create_model(model("b", &["b-1"])).unwrap();
        let clash = ModelPatch {
            aliases: Some(vec!["a-1".into()]),
            ..ModelPatch::default()
        };
        assert!(gateway.update_model("b", clash).is_err());
        assert!(gateway.get_model("b").unwrap().aliases.is_empty());
        assert_eq!(
            gateway.resolve_model("a-1").unwrap().unwrap().model,
            "a",
            "the name still resolves to its model"
        );
    }
}
