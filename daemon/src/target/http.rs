//! The declarative REST target: creates (POST), updates (PUT or PATCH) and deletes
//! (DELETE) items, adopts an existing item with the same name instead of creating a
//! duplicate (and creates nothing when `find`'s answer shows the API ignored the name),
//! strips server-managed fields before every write, and maps HTTP failures to
//! transient (retried later, offset not committed) or permanent (the key is blocked).
//!
//! Before each POST the name it is sent under is noted durably (`Creations`) until the
//! projector records the item's id: a create that a crash cut off from that record is
//! found again by that name, and adopted (renamed if the source renamed the item) or
//! deleted (if the source deleted it), instead of staying on the target as an orphan.
//!
//! An adoption holds its target id's lock (`HttpTarget::adopting`) from its claim until its
//! write is answered: another item whose lookup found that id under its own name while the
//! claimant was renaming it away waits for that write and looks again, instead of taking
//! the rename in flight for a second source item of its name.
//!
//! The projector hands it events whose reference fields already hold target ids, and the
//! item's target id (from applied state or the remap table) in `prior`.
//!
//! A kind with `prefetch_names` is listed once per batch, by its first create, and later
//! creates adopt by name from that listing instead of sending a find request each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tidemark_proto::{canonical_json, strip_fields, Body, Event, Op};
use tokio::sync::{OnceCell, OwnedMutexGuard};
use tracing::{debug, info, warn};

use super::{ApplyError, Claims, Creations, Effect, Outcome, Target};
use crate::config::HttpTargetConfig;
use crate::http::{encode_query_value, id_string, HttpClient, RequestError};
use crate::http_config::{OnConflict, TargetKindConfig, UpdateMethod};
use crate::source::HttpSource;
use crate::state::Applied;

/// The items of one kind by name, from one listing of its collection.
type Names = Mutex<HashMap<String, Vec<Value>>>;

/// One kind's listing for the current batch: made once by the first create that needs it
/// (the others wait for it); `None` when the listing failed, so creates find by name.
type Listing = Arc<OnceCell<Option<Arc<Names>>>>;

/// A REST API written kind by kind.
pub struct HttpTarget {
    client: Arc<HttpClient>,
    cfg: HttpTargetConfig,
    /// Pages of one collection fetched at once when `prefetch_names` lists it.
    page_concurrency: usize,
    /// The `prefetch_names` listings of this batch, by kind. `flush` (after every batch)
    /// drops them, so each batch adopts from a fresh listing and never from one that
    /// misses what others wrote to the target since.
    listings: Mutex<HashMap<String, Listing>>,
    /// Which source item each target id mirrors (the projector's remap table): an item
    /// found by name that another source item owns is not adopted, and not deleted.
    claims: Mutex<Option<Arc<dyn Claims>>>,
    /// The names each item's creates were sent under until its target id is recorded: a
    /// create a crash cut off from that record is found by them (and adopted, or deleted),
    /// whatever the source did to the item since.
    creations: Mutex<Option<Arc<dyn Creations>>>,
    /// A lock per target id (`kind\0id`) an adoption is under way for, held from its claim
    /// until its write is answered. A lookup answered before that write (a rename of the
    /// item a cut-off create made) finds the item under its old name, and the item looking
    /// would take the claimant for a second source item of its name and fail for good:
    /// it waits here, and looks again, instead of racing the rename.
    adopting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The lock of one target id's adoption ([`HttpTarget::adopting`]), released on drop.
struct Adopting<'a> {
    target: &'a HttpTarget,
    slot: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for Adopting<'_> {
    fn drop(&mut self) {
        let mut locks = self
            .target
            .adopting
            .lock()
            .expect("the adoption locks are never poisoned");
        if let Some(guard) = self.guard.take() {
            let lock = OwnedMutexGuard::mutex(&guard).clone();
            drop(guard);
            // Only the table and `lock` hold it: nobody waits, so the slot goes.
            if Arc::strong_count(&lock) == 2 {
                locks.remove(&self.slot);
            }
        }
    }
}

impl HttpTarget {
    /// A target for `cfg` (validated).
    pub fn new(pipeline: &str, cfg: &HttpTargetConfig) -> HttpTarget {
        HttpTarget {
            client: Arc::new(HttpClient::new(pipeline, "target", &cfg.endpoint)),
            cfg: cfg.clone(),
            page_concurrency: cfg.endpoint.in_flight.clamp(1, 8),
            listings: Mutex::new(HashMap::new()),
            claims: Mutex::new(None),
            creations: Mutex::new(None),
            adopting: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the lock of an adoption of target id `id` of `kind`, once any adoption of it
    /// under way has had its write answered (or given up).
    async fn adopting(&self, kind: &str, id: &str) -> Adopting<'_> {
        let slot = format!("{kind}\0{id}");
        let lock = self
            .adopting
            .lock()
            .expect("the adoption locks are never poisoned")
            .entry(slot.clone())
            .or_default()
            .clone();
        Adopting {
            target: self,
            slot,
            guard: Some(lock.lock_owned().await),
        }
    }

    fn creations(&self) -> Option<Arc<dyn Creations>> {
        self.creations
            .lock()
            .expect("the creations lock is never poisoned")
            .clone()
    }

    fn transient(event: &Event, message: String) -> ApplyError {
        ApplyError::Transient {
            kind: event.kind.clone(),
            key: event.key.clone(),
            message,
        }
    }

    fn claims(&self) -> Option<Arc<dyn Claims>> {
        self.claims
            .lock()
            .expect("the claims lock is never poisoned")
            .clone()
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
        if let Some(stray) = Self::stray(kind, name, items) {
            return Err(Self::permanent(
                event,
                self.client.redact(&format!(
                    "the answer to `find` of kind `{}` (GET {path}) holds {stray}: the target's API does not filter by the query `find` sends, so tidemark cannot tell whether the target has the item and creates nothing (it could be a duplicate). Set the kind's `find` to a query the API filters by name (its documentation names the parameter), or set `prefetch_names = true` to adopt from a listing of the whole collection (the kind's `path` and `pagination`)",
                    kind.name,
                )),
            ));
        }
        let matches = items
            .iter()
            .filter(|i| i.pointer(&kind.name_field).and_then(id_string).as_deref() == Some(name));
        Self::pick(kind, event, name, matches)
    }

    /// An item of a find answer that a filter by `name` would not have given, described:
    /// one whose name does not even contain `name`, in any case, or that has no name. An
    /// API that searches instead of matching (case-insensitive, by prefix or substring)
    /// answers only items whose name contains the one asked for, of which tidemark takes
    /// the exact one; one that ignores the query answers its first page, which holds
    /// others (issue: those were taken as "not on the target", and every item past the
    /// first page was created again).
    fn stray(kind: &TargetKindConfig, name: &str, items: &[Value]) -> Option<String> {
        let wanted = name.to_lowercase();
        items.iter().find_map(|item| {
            match item.pointer(&kind.name_field).and_then(id_string) {
                Some(other) if other.to_lowercase().contains(&wanted) => None,
                Some(other) => Some(format!(
                    "an item named `{}`",
                    crate::http::excerpt(&other, 80, "…")
                )),
                None => Some(format!(
                    "an item with no name at `{}` (if the target's items keep their name elsewhere, set the kind's `name_field`)",
                    kind.name_field
                )),
            }
        })
    }

    /// The one item of `matches` (the target's items named `name`), if any: (target id,
    /// item). Several is an error: tidemark cannot tell which one to adopt.
    fn pick<'a>(
        kind: &TargetKindConfig,
        event: &Event,
        name: &str,
        matches: impl IntoIterator<Item = &'a Value>,
    ) -> Result<Option<(String, Value)>, ApplyError> {
        let mut matches = matches.into_iter();
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

    /// This batch's listing of `kind` by name, made now if no create of the batch has made
    /// it yet; `None` when the kind does not prefetch or its listing failed.
    async fn listing(&self, kind: &TargetKindConfig) -> Option<Arc<Names>> {
        if !kind.prefetch_names || kind.find.is_none() {
            return None;
        }
        let cell = self
            .listings
            .lock()
            .expect("the listings lock is never poisoned")
            .entry(kind.name.clone())
            .or_default()
            .clone();
        cell.get_or_init(|| self.list_names(kind)).await.clone()
    }

    /// Lists `kind`'s whole collection (its `path` and `pagination`) and groups the items
    /// by name. A listing with any error is discarded whole: a partial one could miss an
    /// item and let a create duplicate it.
    async fn list_names(&self, kind: &TargetKindConfig) -> Option<Arc<Names>> {
        let mut items = HttpSource::list_raw(
            self.client.clone(),
            kind.name.clone(),
            kind.path.clone(),
            kind.pagination.clone(),
            kind.items.clone(),
            kind.id_field.clone(),
            self.page_concurrency,
        );
        let mut names: HashMap<String, Vec<Value>> = HashMap::new();
        let mut listed = 0usize;
        while let Some(next) = items.next().await {
            match next {
                Ok(item) => {
                    listed += 1;
                    if let Some(name) = item.pointer(&kind.name_field).and_then(id_string) {
                        names.entry(name).or_default().push(item);
                    }
                }
                Err(e) => {
                    warn!(kind = %kind.name, error = %self.client.redact(&e.to_string()), "prefetch_names: the target collection could not be listed; this batch finds each item by name instead (check the kind's path and pagination)");
                    return None;
                }
            }
        }
        debug!(kind = %kind.name, items = listed, names = names.len(), "prefetch_names: listed the target collection");
        Some(Arc::new(Mutex::new(names)))
    }

    /// Records in this batch's listing (if any) that `name` is now `item`, as created:
    /// filed under `name` even when the create response does not echo the name.
    fn remember(names: Option<&Names>, name: &str, item: Value) {
        if let Some(names) = names {
            names
                .lock()
                .expect("a names lock is never poisoned")
                .insert(name.to_owned(), vec![item]);
        }
    }

    /// The target's items under the names earlier creates of `event`'s item were sent
    /// under (its notes: a create whose id was never recorded, cut off by a crash), as
    /// (target id, item, name), each id once. A find is sent under a noted name only after
    /// a lookup found nothing there, so an item found under one now is that create's, and
    /// the source may have renamed or deleted the item since. Not one that another source
    /// item mirrors; a lookup that cannot tell (several items of that name, an API that
    /// ignores the query) is warned of and skipped, never guessed.
    async fn noted_items(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
    ) -> Result<Vec<(String, Value, String)>, ApplyError> {
        let Some(creations) = self.creations() else {
            return Ok(Vec::new());
        };
        if kind.find.is_none() {
            return Ok(Vec::new());
        }
        let identity = event.identity();
        let names = creations.noted(&identity).map_err(|e| {
            Self::transient(
                event,
                format!("cannot read which names its earlier creates were sent under: {e}"),
            )
        })?;
        let mut found: Vec<(String, Value, String)> = Vec::new();
        for name in names {
            match self.find(kind, event, &name).await {
                Ok(Some((id, item))) => {
                    let owner = self
                        .claims()
                        .and_then(|c| c.other_owner(&kind.name, &id, &identity));
                    if let Some(owner) = owner {
                        warn!(kind = %event.kind, key = %event.key, target_id = %id, "an earlier create of this item, cut off before its id was recorded, was sent as `{name}`, but the target's item of that name mirrors the source's `{}` item `{owner}`: it is left alone", event.kind);
                    } else if !found.iter().any(|(f, _, _)| *f == id) {
                        found.push((id, item, name));
                    }
                }
                Ok(None) => {}
                Err(e @ ApplyError::Transient { .. }) => return Err(e),
                Err(e) => {
                    warn!(kind = %event.kind, key = %event.key, "{e}; an earlier create of this item, cut off before its id was recorded, was sent as `{name}`: if the target holds an item of that name that no source item has, remove it by hand");
                }
            }
        }
        Ok(found)
    }

    /// Adopts the item an earlier create of `event`'s item made, found by a noted name
    /// ([`HttpTarget::noted_items`]; the one under the item's current name first), and
    /// writes it as the item is now (a rename included). Any other found there is a
    /// second such create's, and is deleted: each would otherwise stay on the target, a
    /// duplicate no later event names.
    async fn adopt_noted(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        desired: &Value,
    ) -> Result<Option<Effect>, ApplyError> {
        let mut found = self.noted_items(kind, event).await?;
        found.sort_by_key(|(_, _, name)| Some(name) != event.name.as_ref());
        let identity = event.identity();
        let claims = self.claims();
        let mut adopted = None;
        for (id, existing, name) in found {
            if adopted.is_some() {
                if self.delete_id(kind, event, &id).await? {
                    info!(kind = %event.kind, key = %event.key, target_id = %id, "deleted a second copy of this item, made as `{name}` by an earlier create cut off before its id was recorded");
                }
                continue;
            }
            let _adopting = self.adopting(&kind.name, &id).await;
            if let Some(claims) = &claims {
                if claims.claim(&kind.name, &id, &identity).is_err() {
                    continue;
                }
            }
            if Self::same(kind, &existing, desired) {
                adopted = Some(id);
                continue;
            }
            match self.update(kind, event, &id, desired).await {
                Ok(true) => {
                    info!(kind = %event.kind, key = %event.key, target_id = %id, "adopted the item an earlier create, cut off before its id was recorded, made as `{name}`, and updated it");
                    adopted = Some(id);
                }
                Ok(false) => {
                    if let Some(claims) = &claims {
                        claims.release(&kind.name, &id, &identity);
                    }
                }
                Err(e) => {
                    if let Some(claims) = &claims {
                        claims.release(&kind.name, &id, &identity);
                    }
                    return Err(e);
                }
            }
        }
        Ok(adopted.map(|id| Effect {
            outcome: Outcome::Adopted,
            target_id: Some(id),
        }))
    }

    /// Sends a DELETE of `id`: `true` when it deleted it, `false` when the target had no
    /// such item (a 404).
    async fn delete_id(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        id: &str,
    ) -> Result<bool, ApplyError> {
        match self
            .client
            .send(
                Method::DELETE,
                &kind.item_path(&encode_query_value(id)),
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(self.error(event, e)),
        }
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
        if let Some(effect) = self.adopt_noted(kind, event, desired).await? {
            return Ok(effect);
        }
        let started = std::time::Instant::now();
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(200))
            .with_max_elapsed_time(None)
            .build();
        // The first attempt may adopt from this batch's listing; a retry finds by name
        // live, since only the target knows what a lost POST created.
        let mut prefetched = true;
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt = self.create_once(kind, event, desired, prefetched).await;
            prefetched = false;
            match attempt {
                Err(CreateError::Lost(e)) if can_find => {
                    use backoff::backoff::Backoff;
                    let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                    if started.elapsed() + delay > self.client.retry_budget() {
                        return Err(self.error(event, e.gave_up_after(tries, started.elapsed())));
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

    /// One create attempt: adopt by name, or POST. With `prefetched`, the name is looked
    /// up in this batch's listing when the kind has one (`prefetch_names`).
    async fn create_once(
        &self,
        kind: &TargetKindConfig,
        event: &Event,
        desired: &Value,
        prefetched: bool,
    ) -> Result<Effect, CreateError> {
        let names = match (&event.name, prefetched) {
            (Some(_), true) => self.listing(kind).await,
            _ => None,
        };
        if let Some(name) = &event.name {
            let mut found = match &names {
                Some(names) => {
                    let names = names.lock().expect("a names lock is never poisoned");
                    Self::pick(kind, event, name, names.get(name).into_iter().flatten())?
                }
                None => self.find(kind, event, name).await?,
            };
            let mut looked_again = false;
            while let Some((id, existing)) = found.take() {
                let identity = event.identity();
                let claims = self.claims();
                // Held until this adoption's write is answered; taken once another's is.
                let _adopting = self.adopting(&kind.name, &id).await;
                if let Some(claims) = &claims {
                    if let Err(owner) = claims.claim(&kind.name, &id, &identity) {
                        if !looked_again {
                            // What was found may predate the claimant's write, now
                            // answered: a rename away from this name (an item a cut-off
                            // create made, adopted by its noted name). Only a live look
                            // tells a name that is free now from one two items share.
                            looked_again = true;
                            found = self.find(kind, event, name).await?;
                            continue;
                        }
                        // The projector waits for that item's delete, which may come in a
                        // later batch, before it fails this one.
                        return Err(ApplyError::Taken {
                            kind: event.kind.clone(),
                            key: event.key.clone(),
                            message: format!(
                                "the target's `{}` item named `{name}` (id {id}) already mirrors the source's `{}` item `{owner}`, so it is not adopted for this one, nor written: two source items with one name cannot be told apart on the target. Rename one of them in the source",
                                kind.name, event.kind
                            ),
                            target_id: id,
                        }
                        .into());
                    }
                }
                let release = || {
                    if let Some(claims) = &claims {
                        claims.release(&kind.name, &id, &identity);
                    }
                };
                if Self::same(kind, &existing, desired) {
                    return Ok(Effect {
                        outcome: Outcome::Adopted,
                        target_id: Some(id),
                    });
                }
                if self.cfg.on_conflict == OnConflict::Abort {
                    release();
                    return Err(Self::permanent(
                        event,
                        format!(
                            "the target already has a different `{}` item named `{name}` (id {id}) and on_conflict = \"abort\"; rename or remove it, or set on_conflict = \"adopt\" to take it over",
                            kind.name
                        ),
                    )
                    .into());
                }
                match self.update(kind, event, &id, desired).await {
                    Ok(true) => {
                        info!(kind = %event.kind, key = %event.key, target_id = %id, "adopted an existing target item by name and updated it");
                        return Ok(Effect {
                            outcome: Outcome::Adopted,
                            target_id: Some(id),
                        });
                    }
                    Ok(false) => release(),
                    Err(e) => {
                        release();
                        return Err(e.into());
                    }
                }
            }
        }
        if let (Some(name), Some(_), Some(creations)) = (&event.name, &kind.find, self.creations())
        {
            // On disk before the POST goes: should tidemark stop before it records the id,
            // the next run finds the item by this name, even once the source renamed it.
            creations
                .note(&event.identity(), name)
                .await
                .map_err(|e| {
                    Self::transient(
                        event,
                        format!("cannot note in the state that it is being created as `{name}`, which a POST needs first (so that a crash cannot leave the item on the target unknown): {e}"),
                    )
                })?;
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
        if let Some(claims) = self.claims() {
            // A new id is nobody's yet; the claim keeps a later item of the same name from
            // adopting it before this batch's remap is recorded.
            let _ = claims.claim(&kind.name, &id, &event.identity());
        }
        if let Some(name) = &event.name {
            Self::remember(names.as_deref(), name, body);
        }
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
                // What creates cut off by a crash made: the item, with no id recorded (its
                // event was superseded by this delete), or made again after a 404.
                let noted = self.noted_items(kind, event).await?;
                let identity = event.identity();
                let claims = self.claims();
                let mut outcome = Outcome::Unchanged;
                if let Some(id) = &known {
                    if let Some(owner) = claims
                        .as_ref()
                        .and_then(|c| c.other_owner(&kind.name, id, &identity))
                    {
                        // Only a state written before adoption checked claims holds two
                        // items mirrored to one: the other one is still in the source.
                        warn!(kind = %event.kind, key = %event.key, target_id = %id, "not deleting the target's item: it mirrors the source's `{}` item `{owner}` too; only this item's mapping is forgotten", event.kind);
                        return Ok(Effect {
                            outcome: Outcome::Unchanged,
                            target_id: known,
                        });
                    }
                    // A 404: gone from the target already (removed by hand, or by a cascade
                    // of its parent's delete), so this delete deleted nothing: `unchanged`,
                    // as the directory target counts a file already absent.
                    if self.delete_id(kind, event, id).await? {
                        outcome = Outcome::Deleted;
                    }
                    if let Some(claims) = &claims {
                        claims.release(&kind.name, id, &identity);
                    }
                }
                // Without a known id or a noted create the item was never mirrored (it
                // failed, or waited, until the source deleted it): nothing to delete.
                let mut target_id = known.clone();
                for (id, _, name) in noted {
                    if known.as_ref() == Some(&id) {
                        continue;
                    }
                    if self.delete_id(kind, event, &id).await? {
                        info!(kind = %event.kind, key = %event.key, target_id = %id, "deleted the item an earlier create, cut off before its id was recorded, made as `{name}`");
                        outcome = Outcome::Deleted;
                    }
                    target_id.get_or_insert(id);
                }
                Ok(Effect { outcome, target_id })
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

    fn identity(&self) -> String {
        // base_url is checked to carry no credentials; secret query parameters are added
        // per request and are not part of it.
        format!("http {}", self.cfg.endpoint.base_url)
    }

    async fn flush(&self) -> Result<(), ApplyError> {
        self.listings
            .lock()
            .expect("the listings lock is never poisoned")
            .clear();
        Ok(())
    }

    fn reference_wait(&self) -> Duration {
        self.cfg.reference_wait
    }

    fn set_claims(&self, claims: Arc<dyn Claims>) {
        *self
            .claims
            .lock()
            .expect("the claims lock is never poisoned") = Some(claims);
    }

    fn set_creations(&self, creations: Arc<dyn Creations>) {
        *self
            .creations
            .lock()
            .expect("the creations lock is never poisoned") = Some(creations);
    }

    fn deletes_first(&self) -> bool {
        true
    }

    fn skips_superseded(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A find answer may hold items whose name contains the one asked for (an API that
    /// searches: case-insensitive, by prefix or substring); any other item, or one without
    /// a name, shows the API did not filter.
    #[test]
    fn a_find_answer_with_items_a_name_filter_would_not_give_is_told_apart() {
        let kind: TargetKindConfig = toml::from_str("name = \"users\"\npath = \"/users\"").unwrap();
        let names = |names: &[&str]| -> Vec<Value> {
            names.iter().map(|n| json!({"id": 1, "name": n})).collect()
        };
        for searched in [
            &[][..],
            &["alice"],
            &["Alice", "alice"],
            &["alice", "alice2", "Malice"],
        ] {
            assert_eq!(
                HttpTarget::stray(&kind, "alice", &names(searched)),
                None,
                "{searched:?}"
            );
        }
        assert_eq!(
            HttpTarget::stray(&kind, "alice", &names(&["alice", "bob"])).as_deref(),
            Some("an item named `bob`")
        );
        let nameless = HttpTarget::stray(&kind, "alice", &[json!({"id": 1, "title": "alice"})]);
        assert!(
            nameless
                .as_deref()
                .is_some_and(|s| s.contains("no name at `/name`") && s.contains("name_field")),
            "{nameless:?}"
        );
    }
}
