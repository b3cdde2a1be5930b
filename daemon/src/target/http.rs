//! The declarative REST target: creates (POST), updates (PUT or PATCH) and deletes
//! (DELETE) items, adopts an existing item with the same name instead of creating a
//! duplicate, strips server-managed fields before every write, and maps HTTP failures to
//! transient (retried later, offset not committed) or permanent (the key is blocked).
//!
//! The projector hands it events whose reference fields already hold target ids, and the
//! item's target id (from applied state or the remap table) in `prior`.

use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use serde_json::Value;
use tidemark_proto::{canonical_json, strip_fields, Body, Event, Op};
use tracing::info;

use super::{ApplyError, Effect, Outcome, Target};
use crate::config::HttpTargetConfig;
use crate::http::{encode_query_value, id_string, HttpClient, RequestError};
use crate::http_config::{OnConflict, TargetKindConfig, UpdateMethod};
use crate::state::Applied;

/// A REST API written kind by kind.
pub struct HttpTarget {
    client: HttpClient,
    cfg: HttpTargetConfig,
}

impl HttpTarget {
    /// A target for `cfg` (validated).
    pub fn new(pipeline: &str, cfg: &HttpTargetConfig) -> HttpTarget {
        HttpTarget {
            client: HttpClient::new(pipeline, "target", &cfg.endpoint),
            cfg: cfg.clone(),
        }
    }

    /// The client, for `verify`.
    pub fn client(&self) -> &HttpClient {
        &self.client
    }

    fn error(&self, event: &Event, e: RequestError) -> ApplyError {
        let message = self.client.redact(&e.to_string());
        if e.is_transient() {
            ApplyError::Transient {
                kind: event.kind.clone(),
                key: event.key.clone(),
                message,
            }
        } else {
            ApplyError::Permanent {
                kind: event.kind.clone(),
                key: event.key.clone(),
                message,
            }
        }
    }

    fn permanent(event: &Event, message: String) -> ApplyError {
        ApplyError::Permanent {
            kind: event.kind.clone(),
            key: event.key.clone(),
            message,
        }
    }

    /// The existing item named `name`, if any: (target id, item).
    async fn find(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        name: &str,
    ) -> Result<Option<(String, Value)>, ApplyError> {
        let Some(template) = &kind.find else {
            return Ok(None);
        };
        let path = template.replace("{name}", &encode_query_value(name));
        let (_, body) = self
            .client
            .json(Method::GET, &path, None)
            .await
            .map_err(|e| self.error(event, e))?;
        let items = if kind.items.is_empty() {
            Some(&body)
        } else {
            body.pointer(&kind.items)
        };
        let Some(Value::Array(items)) = items else {
            return Err(Self::permanent(
                event,
                format!("GET {path}: the find-by-name response has no array of items"),
            ));
        };
        let mut matches = items
            .iter()
            .filter(|i| i.pointer(&kind.name_field).and_then(id_string).as_deref() == Some(name));
        let Some(found) = matches.next() else {
            return Ok(None);
        };
        if matches.next().is_some() {
            return Err(Self::permanent(
                event,
                format!("the target holds several `{}` items named `{name}`; tidemark cannot tell which one to adopt. Remove the duplicates", kind.name),
            ));
        }
        let id = found
            .pointer(&kind.id_field)
            .and_then(id_string)
            .ok_or_else(|| {
                Self::permanent(
                    event,
                    format!(
                        "the target's `{}` item named `{name}` has no id at `{}`",
                        kind.name, kind.id_field
                    ),
                )
            })?;
        Ok(Some((id, found.clone())))
    }

    fn same(kind: &TargetKindConfig, existing: &Value, desired: &Value) -> bool {
        let mut existing = existing.clone();
        strip_fields(&mut existing, &kind.strip);
        canonical_json(&existing) == canonical_json(desired)
    }

    async fn update(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        id: &str,
        desired: &Value,
    ) -> Result<bool, ApplyError> {
        let method = match self.cfg.update_method {
            UpdateMethod::Put => Method::PUT,
            UpdateMethod::Patch => Method::PATCH,
        };
        match self
            .client
            .send(
                method,
                &kind.item_path(&encode_query_value(id)),
                Some(desired),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(self.error(event, e)),
        }
    }

    async fn create(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        desired: &Value,
    ) -> Result<Effect, ApplyError> {
        // A POST whose answer was lost may have created the item. When the kind can be
        // found by name, every new attempt looks first and adopts what a lost one made,
        // so a flaky connection never creates a duplicate.
        let can_find = event.name.is_some() && kind.find.is_some();
        let started = std::time::Instant::now();
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(200))
            .with_max_elapsed_time(None)
            .build();
        loop {
            match self.create_once(kind, event, desired).await {
                Err(CreateError::Lost(e)) if can_find => {
                    use backoff::backoff::Backoff;
                    let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                    if started.elapsed() + delay > self.client.retry_budget() {
                        return Err(self.error(event, e));
                    }
                    self.client.count_retry();
                    tokio::time::sleep(delay).await;
                }
                Err(CreateError::Lost(e)) => return Err(self.error(event, e)),
                Err(CreateError::Apply(e)) => return Err(e),
                Ok(effect) => return Ok(effect),
            }
        }
    }

    /// One create attempt: adopt by name, or POST.
    async fn create_once(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        desired: &Value,
    ) -> Result<Effect, CreateError> {
        if let Some(name) = &event.name {
            if let Some((id, existing)) = self.find(kind, event, name).await? {
                if Self::same(kind, &existing, desired) {
                    return Ok(Effect {
                        outcome: Outcome::Adopted,
                        target_id: Some(id),
                    });
                }
                if self.cfg.on_conflict == OnConflict::Abort {
                    return Err(Self::permanent(
                        event,
                        format!(
                            "the target already has a different `{}` item named `{name}` (id {id}) and on_conflict = \"abort\"; rename or remove it, or set on_conflict = \"adopt\" to take it over",
                            kind.name
                        ),
                    )
                    .into());
                }
                if self.update(kind, event, &id, desired).await? {
                    info!(kind = %event.kind, key = %event.key, target_id = %id, "adopted an existing target item by name and updated it");
                    return Ok(Effect {
                        outcome: Outcome::Adopted,
                        target_id: Some(id),
                    });
                }
            }
        }
        let (resp, body) = match self
            .client
            .json(Method::POST, &kind.path, Some(desired))
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_transient() => return Err(CreateError::Lost(e)),
            Err(e) => return Err(self.error(event, e).into()),
        };
        let id = body
            .pointer(&kind.id_field)
            .and_then(id_string)
            .ok_or_else(|| {
                Self::permanent(
                    event,
                    format!(
                        "POST {}: the response has no id at `{}`; set id_field for kind `{}`",
                        resp.url, kind.id_field, kind.name
                    ),
                )
            })?;
        Ok(Effect {
            outcome: Outcome::Created,
            target_id: Some(id),
        })
    }
}

/// Why one create attempt failed.
enum CreateError {
    /// The POST may or may not have created the item (its answer was lost).
    Lost(RequestError),
    /// Anything else, already classified.
    Apply(ApplyError),
}

impl From<ApplyError> for CreateError {
    fn from(e: ApplyError) -> CreateError {
        CreateError::Apply(e)
    }
}

#[async_trait]
impl Target for HttpTarget {
    async fn apply(&self, event: &Event, prior: Option<&Applied>) -> Result<Effect, ApplyError> {
        let kind = self.cfg.kind(&event.kind).ok_or_else(|| {
            Self::permanent(
                event,
                format!("no [[pipeline.target.http.kind]] named `{}`", event.kind),
            )
        })?;
        let known = prior.and_then(|p| p.target_id.clone());
        match event.op {
            Op::Delete => {
                let Some(id) = known else {
                    return Ok(Outcome::Deleted.into());
                };
                match self
                    .client
                    .send(
                        Method::DELETE,
                        &kind.item_path(&encode_query_value(&id)),
                        None,
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.status() == Some(404) => {}
                    Err(e) => return Err(self.error(event, e)),
                }
                Ok(Effect {
                    outcome: Outcome::Deleted,
                    target_id: Some(id),
                })
            }
            Op::Upsert => {
                let Some(Body::Json(body)) = &event.body else {
                    return Err(Self::permanent(
                        event,
                        "the event carries no JSON body".into(),
                    ));
                };
                let mut desired = body.clone();
                strip_fields(&mut desired, &kind.strip);
                if let Some(id) = known {
                    // A prior without a version comes from the remap table alone (after a
                    // replay): read first, so an equal item costs no write.
                    if prior.is_some_and(|p| p.version.is_empty()) {
                        let path = kind.item_path(&encode_query_value(&id));
                        match self.client.json(Method::GET, &path, None).await {
                            Ok((_, existing)) if Self::same(kind, &existing, &desired) => {
                                return Ok(Effect {
                                    outcome: Outcome::Adopted,
                                    target_id: Some(id),
                                });
                            }
                            Ok(_) => {}
                            Err(e) if e.status() == Some(404) => {
                                return self.create(kind, event, &desired).await
                            }
                            Err(e) => return Err(self.error(event, e)),
                        }
                    }
                    if self.update(kind, event, &id, &desired).await? {
                        return Ok(Effect {
                            outcome: Outcome::Updated,
                            target_id: Some(id),
                        });
                    }
                    // Gone from the target behind tidemark's back: create it again.
                }
                self.create(kind, event, &desired).await
            }
        }
    }

    async fn flush(&self) -> Result<(), ApplyError> {
        Ok(())
    }

    fn reference_wait(&self) -> Duration {
        self.cfg.reference_wait
    }
}
