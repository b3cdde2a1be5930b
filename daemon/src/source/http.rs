//! The declarative REST source: lists every configured kind page by page (pages fetched
//! with bounded concurrency when the API says how many there are), streams the items to
//! the scanner, and turns each into an item: source id as key, the name field, the
//! references, and the JSON body minus ignored fields.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::Value;
use tidemark_proto::{checksum_json, strip_fields, Body, Ref};

use super::{Entry, FetchError, Item, ListError, ListStream, Listing, RefField, Source};
use crate::config::HttpSourceConfig;
use crate::http::{encode_query_value, excerpt, id_string, HttpClient, RequestError};
use crate::http_config::{Pagination, SourceKindConfig};

/// Listing entries buffered between the page fetchers and the scanner.
const CHANNEL: usize = 512;

/// A REST API listed kind by kind.
pub struct HttpSource {
    client: Arc<HttpClient>,
    kinds: Arc<Vec<SourceKindConfig>>,
    /// Pages of one kind fetched at once.
    page_concurrency: usize,
}

impl HttpSource {
    /// A source for `cfg` (validated).
    pub fn new(pipeline: &str, cfg: &HttpSourceConfig) -> HttpSource {
        HttpSource {
            client: Arc::new(HttpClient::new(pipeline, "source", &cfg.endpoint)),
            kinds: Arc::new(cfg.kinds.clone()),
            page_concurrency: cfg.endpoint.in_flight.clamp(1, 8),
        }
    }

    /// Lists the items of one kind of `client`'s API, as raw JSON: for `verify`, and for
    /// the target's `prefetch_names`. A failed page ends the listing with an error, so a
    /// reader can tell a complete listing from a partial one. `id_field` is where an
    /// item's id is: a page whose items were all listed before ends the listing with an
    /// error, as pagination that goes round would never end ([`Seen`]).
    pub fn list_raw(
        client: Arc<HttpClient>,
        kind: String,
        path: String,
        pagination: Pagination,
        items: String,
        id_field: String,
        page_concurrency: usize,
    ) -> mpsc::Receiver<Result<Value, ListError>> {
        let (mut tx, rx) = mpsc::channel(CHANNEL);
        tokio::spawn(async move {
            let pages = Pager {
                client: &client,
                kind: &kind,
                path: &path,
                pagination: &pagination,
                items: &items,
                id_field: &id_field,
                page_concurrency,
            };
            pages.run(&mut tx).await;
        });
        rx
    }
}

fn list_error(kind: &str, e: impl std::fmt::Display) -> ListError {
    ListError::Kind {
        kind: kind.to_owned(),
        message: e.to_string(),
    }
}

/// Fetches the pages of one kind and sends their items, in order.
struct Pager<'a> {
    client: &'a HttpClient,
    kind: &'a str,
    path: &'a str,
    pagination: &'a Pagination,
    items: &'a str,
    id_field: &'a str,
    page_concurrency: usize,
}

/// The items a listing has read so far (a hash of each one's id, or of the whole item when
/// it has none), to tell pages that go round from pages that move on. An API that does
/// not know the page (or offset) parameter answers every page as the first, a `Link` or
/// a cursor can lead back to a page already read, and without a total count nothing else
/// ends such a listing: the scan never ended. A page (not empty) whose items were all
/// read before is taken for that. Pages that shifted a whole page while they were read
/// (as many items created at once at the start) look the same; that listing is then
/// incomplete anyway, and the next one reads them.
struct Seen<'a> {
    id_field: &'a str,
    items: std::collections::HashSet<u64>,
}

impl<'a> Seen<'a> {
    fn new(id_field: &'a str) -> Seen<'a> {
        Seen {
            id_field,
            items: std::collections::HashSet::new(),
        }
    }

    /// `None` when `items` brings anything new (recording it), or else what the page
    /// held, for the error: how many items, and the id of the first.
    fn again(&mut self, items: &[Value]) -> Option<String> {
        use std::hash::{Hash, Hasher};
        let hashes: Vec<u64> = items
            .iter()
            .map(|item| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                match item.pointer(self.id_field).and_then(id_string) {
                    Some(id) => (0u8, id).hash(&mut h),
                    None => (1u8, item.to_string()).hash(&mut h),
                }
                h.finish()
            })
            .collect();
        if hashes.is_empty() || !hashes.iter().all(|h| self.items.contains(h)) {
            self.items.extend(hashes);
            return None;
        }
        let first = items[0]
            .pointer(self.id_field)
            .and_then(id_string)
            .map_or(String::new(), |id| {
                format!(", the first with the id `{id}` at `{}`", self.id_field)
            });
        Some(format!(
            "it holds only items this listing already read ({} items{first})",
            items.len()
        ))
    }
}

impl Pager<'_> {
    fn with_params(&self, params: &[(&str, String)]) -> String {
        let mut url = self.path.to_owned();
        for (k, v) in params {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&encode_query_value(k));
            url.push('=');
            url.push_str(&encode_query_value(v));
        }
        url
    }

    /// One page: its items and the response (for headers and the body's cursor).
    async fn page(&self, path: &str) -> Result<(Vec<Value>, crate::http::Response, Value), String> {
        let (resp, body) = self
            .client
            .json(Method::GET, path, None)
            .await
            .map_err(|e: RequestError| e.to_string())?;
        let list = if self.items.is_empty() {
            Some(&body)
        } else {
            body.pointer(self.items)
        };
        match list {
            Some(Value::Array(items)) => Ok((items.clone(), resp, body)),
            _ => Err(format!(
                "GET {}: no array of items at `{}` in the response",
                resp.url,
                if self.items.is_empty() {
                    "(top level)"
                } else {
                    self.items
                }
            )),
        }
    }

    async fn send_all(
        &self,
        tx: &mut mpsc::Sender<Result<Value, ListError>>,
        items: Vec<Value>,
    ) -> bool {
        for item in items {
            if tx.send(Ok(item)).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn run(&self, tx: &mut mpsc::Sender<Result<Value, ListError>>) {
        if let Err(e) = self.pages(tx).await {
            let _ = tx.send(Err(list_error(self.kind, e))).await;
        }
    }

    async fn pages(&self, tx: &mut mpsc::Sender<Result<Value, ListError>>) -> Result<(), String> {
        match self.pagination {
            Pagination::None => {
                let (items, _, _) = self.page(self.path).await?;
                self.send_all(tx, items).await;
            }
            Pagination::Page {
                page_param,
                size_param,
                size,
                first,
                total_header,
            } => {
                let url = |n: usize| {
                    self.with_params(&[(page_param, n.to_string()), (size_param, size.to_string())])
                };
                // A page answered as an earlier one: the API does not read `page_param`.
                let again = |seen: &mut Seen,
                             items: &[Value],
                             resp: &crate::http::Response,
                             n: usize| {
                    seen.again(items).map_or(Ok(()), |held| {
                        Err(format!(
                            "GET {}: page {n} answers as an earlier page: {held}. The API does not seem to read the page number from `{page_param}` (an API answers a parameter it does not know with its first page), so the listing would never end. Check the kind's `page_param` (and `first`, the number of its first page)",
                            resp.url
                        ))
                    })
                };
                let mut seen = Seen::new(self.id_field);
                let (items, resp, _) = self.page(&url(*first)).await?;
                seen.again(&items);
                let total = total_of(&resp, total_header);
                let got = items.len();
                if let Some(total) = total.filter(|&t| got < *size && got < t) {
                    // Page numbers count pages of `size` items: past a page the API cut
                    // short, they would skip what it left out.
                    return Err(if got == 0 {
                        format!(
                            "GET {}: the first page holds no items, but the API says it has {total} (`{total_header}`): check the kind's `first` (the number of its first page) and `page_param`",
                            resp.url
                        )
                    } else {
                        format!(
                            "GET {}: the first page holds {got} items where `size = {size}` asked for {size}, and the API says it has {total} (`{total_header}`): it caps its page size below `size`, so the pages after it would skip items. Set the kind's `size` to {got} or less",
                            resp.url
                        )
                    });
                }
                if !self.send_all(tx, items).await || got < *size {
                    return Ok(());
                }
                match total {
                    Some(total) => {
                        // The count is known: fetch the other pages concurrently, in order.
                        let pages = total.div_ceil(*size);
                        let mut listed = got;
                        let mut rest = futures::stream::iter(first + 1..first + pages)
                            .map(|n| {
                                let u = url(n);
                                async move { self.page(&u).await }
                            })
                            .buffered(self.page_concurrency);
                        let mut n = *first;
                        while let Some(page) = rest.next().await {
                            let (items, resp, _) = page?;
                            n += 1;
                            again(&mut seen, &items, &resp, n)?;
                            listed += items.len();
                            if !self.send_all(tx, items).await {
                                return Ok(());
                            }
                        }
                        short_of_total(listed, total, total_header, *size)?;
                    }
                    None => {
                        let mut n = first + 1;
                        loop {
                            let (items, resp, _) = self.page(&url(n)).await?;
                            again(&mut seen, &items, &resp, n)?;
                            let done = items.len() < *size;
                            if !self.send_all(tx, items).await || done {
                                break;
                            }
                            n += 1;
                        }
                    }
                }
            }
            Pagination::Offset {
                offset_param,
                limit_param,
                size,
                total_header,
            } => {
                // The offset moves by the items received, so a page the API cut short
                // (a cap below `size`) skips nothing; with a total, only reaching it (or
                // an empty page) ends the listing, not a short page.
                let mut offset = 0;
                let mut total = None;
                let mut seen = Seen::new(self.id_field);
                loop {
                    let u = self.with_params(&[
                        (offset_param, offset.to_string()),
                        (limit_param, size.to_string()),
                    ]);
                    let (items, resp, _) = self.page(&u).await?;
                    if offset == 0 {
                        total = total_of(&resp, total_header);
                    }
                    if let Some(held) = seen.again(&items) {
                        return Err(format!(
                            "GET {}: the answer at offset {offset} repeats earlier ones: {held}. The API does not seem to read the offset from `{offset_param}` (an API answers a parameter it does not know from the start), so the listing would never end. Check the kind's `offset_param`",
                            resp.url
                        ));
                    }
                    let n = items.len();
                    if !self.send_all(tx, items).await {
                        return Ok(());
                    }
                    offset += n;
                    let done = match total {
                        Some(total) => n == 0 || offset >= total,
                        None => n < *size,
                    };
                    if done {
                        break;
                    }
                }
                if let Some(total) = total {
                    short_of_total(offset, total, total_header, *size)?;
                }
            }
            Pagination::Link => {
                let mut next = Some(self.path.to_owned());
                let mut seen = Seen::new(self.id_field);
                // The pages requested, as full URLs: a link back to one goes round.
                let mut requested = std::collections::HashSet::new();
                while let Some(u) = next.take() {
                    requested.insert(
                        self.client
                            .url(&u)
                            .map_or_else(|_| u.clone(), |u| normal(&u)),
                    );
                    let (items, resp, _) = self.page(&u).await?;
                    if let Some(held) = seen.again(&items) {
                        return Err(format!(
                            "GET {}: the page its previous page's `Link: rel=\"next\"` leads to repeats earlier pages: {held}, so the listing would never end. The API's next-page links go round: check the kind's `path` and `pagination` (`style = \"link\"` follows `rel=\"next\"` until a page has none)",
                            resp.url
                        ));
                    }
                    let link = resp
                        .headers
                        .get_all(reqwest::header::LINK)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find_map(next_link);
                    if !self.send_all(tx, items).await {
                        break;
                    }
                    // A link to another origin ends the listing with an error: the
                    // request would carry the credentials there.
                    if let Some(link) = link {
                        let to = self.client.next_page(&u, &link)?;
                        if requested.contains(&normal(&to)) {
                            return Err(format!(
                                "GET {}: the next page's link (`Link: <{}>; rel=\"next\"`) leads back to {}, a page this listing already read, so the listing would never end. The API's next-page links go round: check the kind's `path` and `pagination` (`style = \"link\"` follows `rel=\"next\"` until a page has none)",
                                resp.url,
                                self.client.shown(&link),
                                self.client.shown(&to)
                            ));
                        }
                        next = Some(to);
                    }
                }
            }
            Pagination::Cursor {
                cursor_pointer,
                cursor_param,
            } => {
                let mut u = self.path.to_owned();
                let mut seen = Seen::new(self.id_field);
                let mut cursors = std::collections::HashSet::new();
                let round = format!(
                    "so the listing would never end. The API does not seem to read the cursor from `{cursor_param}`, or `{cursor_pointer}` is not where it puts the next page's cursor: check the kind's `cursor_param` and `cursor_pointer`"
                );
                loop {
                    let (items, resp, body) = self.page(&u).await?;
                    if let Some(held) = seen.again(&items) {
                        return Err(format!(
                            "GET {}: the page repeats earlier pages: {held}, {round}",
                            resp.url
                        ));
                    }
                    let cursor = body
                        .pointer(cursor_pointer)
                        .and_then(id_string)
                        .filter(|c| !c.is_empty());
                    if let Some(c) = cursor.as_ref().filter(|c| !cursors.insert((*c).clone())) {
                        return Err(format!(
                            "GET {}: the next cursor at `{cursor_pointer}`, `{}`, was sent before, {round}",
                            resp.url,
                            excerpt(c, 60, "...")
                        ));
                    }
                    if !self.send_all(tx, items).await {
                        break;
                    }
                    match cursor {
                        Some(c) => u = self.with_params(&[(cursor_param, c)]),
                        None => break,
                    }
                }
            }
        }
        Ok(())
    }
}

/// `url` written one way (scheme and host in lower case, no default port), to tell a
/// page requested before.
fn normal(url: &str) -> String {
    reqwest::Url::parse(url).map_or_else(|_| url.to_owned(), String::from)
}

/// The total number of items a list response announces in `header`, if it does.
fn total_of(resp: &crate::http::Response, header: &str) -> Option<usize> {
    resp.headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// A listing that ended with fewer items than the API's total is incomplete: an item it
/// missed would be deleted, copied to the target never, or created there twice.
fn short_of_total(listed: usize, total: usize, header: &str, size: usize) -> Result<(), String> {
    if listed >= total {
        return Ok(());
    }
    Err(format!(
        "the API said it has {total} items (`{header}`), {listed} were listed: it may cap its page size below `size = {size}` (lower `size`), or items were deleted from it while its pages were read (the next listing reaches them)"
    ))
}

/// Where the source answers for the item `key` of `kind`: its `detail_path`, or else its
/// list `path` (without the query: pagination or filters) followed by `/{id}`.
fn item_path(kind: &SourceKindConfig, key: &str) -> String {
    let id = encode_query_value(key);
    match &kind.detail_path {
        Some(detail) => detail.replace("{id}", &id),
        None => {
            let path = kind.path.split('?').next().unwrap_or_default();
            format!("{}/{id}", path.trim_end_matches('/'))
        }
    }
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        (is_next && !url.is_empty()).then(|| url.to_owned())
    })
}

/// The references an item holds, per configured reference field. A field that holds
/// neither an id (a string or number), nor an array of them, nor nothing (absent, null or
/// an empty string: no reference) is an error naming it: written as it is, it would carry
/// the source's value to the target unmapped.
pub fn extract_refs(kind: &SourceKindConfig, item: &Value) -> Result<Vec<Ref>, String> {
    let mut refs = Vec::new();
    let unusable = |field: &str, v: &Value| {
        let shown = excerpt(&v.to_string(), 57, "...");
        format!(
            "reference field `{field}` holds {} ({shown}), not an id (a string or number) or an array of ids, so it cannot be mapped to the target's id; the item is left out until it is fixed in the source (or the kind's `ref` points at the id itself)",
            json_type(v)
        )
    };
    let nothing = |v: &Value| v.is_null() || v.as_str().is_some_and(str::is_empty);
    for r in &kind.refs {
        match item.pointer(&r.field) {
            Some(Value::Array(ids)) => {
                for (i, v) in ids.iter().enumerate() {
                    match id_string(v) {
                        Some(key) => refs.push(Ref {
                            kind: r.kind.clone(),
                            key,
                            path: format!("{}/{i}", r.field),
                        }),
                        None if nothing(v) => {}
                        None => return Err(unusable(&format!("{}/{i}", r.field), v)),
                    }
                }
            }
            Some(v) => match id_string(v) {
                Some(key) => refs.push(Ref {
                    kind: r.kind.clone(),
                    key,
                    path: r.field.clone(),
                }),
                None if nothing(v) => {}
                None => return Err(unusable(&r.field, v)),
            },
            None => {}
        }
    }
    Ok(refs)
}

/// An item's checksum: of its body and, when it holds references, of which fields hold
/// them and which kind each names. What the target gets depends on both (the ids at those
/// fields are mapped to the target's), so a `[[…kind.ref]]` added, fixed or removed in the
/// config changes the version of the items it concerns, and the next scan emits them
/// again; before, items mirrored under a mistyped pointer kept the source's ids on the
/// target once it was fixed. An item without references keeps its body's checksum.
fn item_checksum(item: &Value, refs: &[Ref]) -> String {
    if refs.is_empty() {
        return checksum_json(item, &[]);
    }
    let refs: Vec<Value> = refs
        .iter()
        .map(|r| serde_json::json!([r.path, r.kind]))
        .collect();
    checksum_json(&serde_json::json!({"body": item, "refs": refs}), &[])
}

/// Whether `item` has each reference field of its kind (but the optional ones), with a
/// near field where it has not.
fn ref_fields(kind: &SourceKindConfig, item: &Value) -> Vec<RefField> {
    kind.refs
        .iter()
        .filter(|r| !r.optional)
        .map(|r| {
            let present = item.pointer(&r.field).is_some();
            RefField {
                field: r.field.clone(),
                present,
                near: (!present).then(|| near_field(item, &r.field)).flatten(),
            }
        })
        .collect()
}

/// Where `item` lacks `pointer`: the pointer with its first missing step replaced by the
/// nearest key the item has there that differs only in case or by a letter or two (see
/// [`near_name`]), when that leads to a field of the item.
fn near_field(item: &Value, pointer: &str) -> Option<String> {
    let steps: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    let mut at = item;
    for (i, step) in steps.iter().enumerate() {
        let next = match at {
            Value::Object(fields) => fields.get(step),
            Value::Array(items) => step.parse::<usize>().ok().and_then(|n| items.get(n)),
            _ => None,
        };
        if let Some(next) = next {
            at = next;
            continue;
        }
        let Value::Object(fields) = at else {
            return None;
        };
        let mut near: Vec<(usize, &String)> = fields
            .keys()
            .filter_map(|k| near_name(k, step).map(|d| (d, k)))
            .collect();
        near.sort();
        return near.into_iter().find_map(|(_, key)| {
            let mut fixed = steps.clone();
            fixed[i] = key.clone();
            let fixed: String = fixed
                .iter()
                .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
                .collect();
            item.pointer(&fixed).is_some().then_some(fixed)
        });
    }
    None
}

/// How far `key` is from `wanted`, ignoring case: the letters to change, add or remove
/// (0 when only the case differs), if at most 2 and at most a third of `wanted`'s length,
/// so that `id` is not offered for `ix`.
fn near_name(key: &str, wanted: &str) -> Option<usize> {
    let a: Vec<char> = key.to_lowercase().chars().collect();
    let b: Vec<char> = wanted.to_lowercase().chars().collect();
    // Levenshtein distance, one row at a time.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    let d = row[b.len()];
    (d <= 2 && d * 3 <= b.len()).then_some(d)
}

/// Why a listed item has no usable id, with enough of the item to find it in the source.
fn no_id(kind: &str, field: &str, item: &Value) -> String {
    let what = match item.pointer(field) {
        None => format!("has no id at `{field}`"),
        Some(v) => format!("has {} at `{field}`, not a string or number", json_type(v)),
    };
    let shown = excerpt(&item.to_string(), 117, "...");
    format!("kind `{kind}`: an item {what}; it is left out: {shown}")
}

/// Why the second item listed with the id `key` is left out.
fn listed_twice(
    kind: &SourceKindConfig,
    key: &str,
    first: Option<&str>,
    again: Option<&str>,
) -> String {
    let names = match (first, again) {
        (Some(a), Some(b)) => format!(" (first as `{a}`, again as `{b}`)"),
        _ => String::new(),
    };
    format!(
        "kind `{}`: the id `{key}` at `{}` is listed twice{names}; the second is left out. Every item needs an id of its own there: check `id_field` (a field many items share, such as a reference, makes them one item), or the API's pages shifted while they were read",
        kind.name, kind.id_field
    )
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(s) if s.is_empty() => "an empty string",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[async_trait]
impl Source for HttpSource {
    fn list(&self) -> ListStream {
        let (mut tx, rx) = mpsc::channel::<Result<Listing, ListError>>(CHANNEL);
        let client = self.client.clone();
        let kinds = self.kinds.clone();
        let page_concurrency = self.page_concurrency;
        tokio::spawn(async move {
            for kind in kinds.iter() {
                let mut items = HttpSource::list_raw(
                    client.clone(),
                    kind.name.clone(),
                    kind.path.clone(),
                    kind.pagination.clone(),
                    kind.items.clone(),
                    kind.id_field.clone(),
                    page_concurrency,
                );
                // The ids listed so far, with the item's name: an id listed twice (a
                // mistyped `id_field` that points at a shared field, or pages that shifted
                // while they were read) would merge two items into one, and a shifted page
                // may have hidden another item from the listing, so it is a listing error.
                let mut listed: HashMap<String, Option<String>> = HashMap::new();
                while let Some(next) = items.next().await {
                    let listing = next.and_then(|item| {
                        let key = item
                            .pointer(&kind.id_field)
                            .and_then(id_string)
                            .ok_or_else(|| ListError::Entry {
                                key: format!("{} item", kind.name),
                                message: no_id(&kind.name, &kind.id_field, &item),
                            })?;
                        let name = kind
                            .name_field
                            .as_deref()
                            .and_then(|p| item.pointer(p))
                            .and_then(id_string);
                        if let Some(first) = listed.get(&key) {
                            return Err(ListError::Entry {
                                key: format!("{} {key}", kind.name),
                                message: listed_twice(
                                    kind,
                                    &key,
                                    first.as_deref(),
                                    name.as_deref(),
                                ),
                            });
                        }
                        listed.insert(key.clone(), name);
                        Ok(Listing::Entry(Entry {
                            kind: kind.name.clone(),
                            key,
                            fingerprint: None,
                            payload: Some(item),
                        }))
                    });
                    if tx.send(listing).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx.boxed()
    }

    /// The source asks each item it would delete, since a listing can miss a live one
    /// without any sign: an item deleted between two page requests shifts the items
    /// after it one place up, and one of them is on no page read.
    fn confirms_deletes(&self) -> bool {
        true
    }

    /// Which of `entries` are gone: one GET of each item's path ([`item_path`]), with
    /// at most `page_concurrency` of them at once. 404 or 410 is gone; 2xx is still
    /// there (not listed, not gone: not deleted); any other answer, once retries are
    /// spent, is an error, so the scan deletes nothing. An item of a kind no longer
    /// configured, or of a kind with `confirm_deletes = false` (a `path` that filters), is
    /// no longer listed on purpose: gone.
    async fn absent(
        &self,
        entries: Vec<(String, String)>,
    ) -> Result<std::collections::HashSet<(String, String)>, String> {
        let mut checks = futures::stream::iter(entries)
            .map(|(kind, key)| async move {
                let Some(config) = self.kinds.iter().find(|k| k.name == kind) else {
                    return Ok(Some((kind, key)));
                };
                // A `path` that filters (`/users?active=true`): an item that fell out of
                // the filter is gone from the mirror though dev still answers for it.
                if !config.confirm_deletes {
                    return Ok(Some((kind, key)));
                }
                match self
                    .client
                    .send(Method::GET, &item_path(config, &key), None)
                    .await
                {
                    Ok(_) => Ok(None),
                    Err(e) if matches!(e.status(), Some(404 | 410)) => Ok(Some((kind, key))),
                    Err(e) => Err(format!(
                        "kind `{kind}`: `{key}` was not listed, and asking the source whether it is gone failed: {e}. It is not deleted until the source answers 404 for it (the next scan asks again)"
                    )),
                }
            })
            .buffer_unordered(self.page_concurrency);
        let mut absent = std::collections::HashSet::new();
        while let Some(check) = checks.next().await {
            absent.extend(check?);
        }
        Ok(absent)
    }

    async fn fetch(&self, entry: Entry) -> Result<Item, FetchError> {
        let fail = |message: String| FetchError::Entry {
            key: format!("{} {}", entry.kind, entry.key),
            message,
        };
        let kind = self
            .kinds
            .iter()
            .find(|k| k.name == entry.kind)
            .ok_or_else(|| fail(format!("kind `{}` is not configured", entry.kind)))?;
        let mut item = match (&kind.detail_path, entry.payload.clone()) {
            (Some(_), _) => {
                let path = item_path(kind, &entry.key);
                self.client
                    .json(Method::GET, &path, None)
                    .await
                    .map_err(|e| fail(format!("kind `{}`: {e}", kind.name)))?
                    .1
            }
            (None, Some(p)) => p,
            (None, None) => return Err(fail("the listing carried no content".into())),
        };
        // Before `ignore` is stripped: a reference field left out of the body on purpose
        // is not a mistyped one.
        let ref_fields = ref_fields(kind, &item);
        strip_fields(&mut item, &kind.ignore);
        let name = kind
            .name_field
            .as_deref()
            .and_then(|p| item.pointer(p))
            .and_then(id_string);
        let warning = match (&kind.name_field, &name) {
            (Some(field), None) => Some(format!(
                "item has no name at `{field}`: the target cannot find it by name, so a lost create or a lost state can create it twice"
            )),
            _ => None,
        };
        let refs = extract_refs(kind, &item)
            .map_err(|e| fail(format!("kind `{}` item `{}`: {e}", kind.name, entry.key)))?;
        Ok(Item {
            kind: entry.kind.clone(),
            key: entry.key.clone(),
            checksum: item_checksum(&item, &refs),
            mode: None,
            name,
            refs,
            body: Some(Body::Json(item)),
            blob: None,
            mtime_ns: None,
            warning,
            ref_fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_without_a_usable_id_is_described_with_what_it_holds() {
        let missing = no_id("posts", "/id", &serde_json::json!({"name": "noid"}));
        assert!(
            missing.contains("has no id at `/id`") && missing.contains("noid"),
            "{missing}"
        );
        let object = no_id(
            "posts",
            "/id",
            &serde_json::json!({"id": {"x": 1}, "name": "objid"}),
        );
        assert!(
            object.contains("has an object at `/id`") && object.contains("objid"),
            "{object}"
        );
        let long = no_id(
            "posts",
            "/id",
            &serde_json::json!({"body": "é".repeat(200)}),
        );
        assert!(
            long.ends_with("...") && long.chars().count() < 200,
            "{long}"
        );
    }

    /// A reference field no item has is reported with the field the items do have, when
    /// its name is the configured one but for case or a letter or two.
    #[test]
    fn a_missing_reference_field_is_matched_to_a_near_one() {
        let item = serde_json::json!({
            "id": 1, "userId": 7, "user_id": 8, "author": {"id": 3}, "ix": 1, "tags": [{"ref": 2}]
        });
        assert_eq!(near_field(&item, "/userid").as_deref(), Some("/userId"));
        assert_eq!(near_field(&item, "/userID").as_deref(), Some("/userId"));
        assert_eq!(near_field(&item, "/usrId").as_deref(), Some("/userId"));
        assert_eq!(
            near_field(&item, "/Author/id").as_deref(),
            Some("/author/id")
        );
        assert_eq!(
            near_field(&item, "/author/Id").as_deref(),
            Some("/author/id")
        );
        assert_eq!(
            near_field(&item, "/tags/0/Ref").as_deref(),
            Some("/tags/0/ref")
        );
        // Nothing near: no advice rather than a wrong one.
        assert_eq!(near_field(&item, "/ownerId"), None);
        assert_eq!(near_field(&item, "/ab"), None);
        assert_eq!(near_field(&item, "/autor/name"), None);
    }

    #[test]
    fn finds_the_next_link() {
        let h = r#"<https://a/x?page=1>; rel="prev", <https://a/x?page=3>; rel="next""#;
        assert_eq!(next_link(h).as_deref(), Some("https://a/x?page=3"));
        assert_eq!(next_link(r#"<https://a/x?page=1>; rel="prev""#), None);
    }
}
