//! The config of the REST connector (`[pipeline.source.http]`, `[pipeline.target.http]`):
//! what serde parses, and the validation that resolves secrets from environment variables
//! or files. Secrets are never written in the config and never printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A secret value (a token, a header value). `Debug` and `Display` never show it.
#[derive(Clone, Default, PartialEq)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `value`.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a secret comes from: exactly one of an environment variable or a file.
#[derive(Debug, Clone, Default)]
pub struct SecretSource {
    /// Name of the environment variable holding the value.
    pub env: Option<String>,
    /// File holding the value (surrounding whitespace removed, as for `env`); relative to
    /// the config file.
    pub file: Option<PathBuf>,
}

/// The table a [`SecretSource`] is written as.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFields {
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    file: Option<PathBuf>,
}

/// Accepts `{ env = … }` or `{ file = … }`. A secret written in the config as a plain value
/// is refused with a message that does not repeat it (serde's own would quote it).
impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = SecretSource;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`{ env = \"VARIABLE\" }` or `{ file = \"path\" }`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SecretSource, A::Error> {
                let f =
                    SecretFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(SecretSource {
                    env: f.env,
                    file: f.file,
                })
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<SecretSource, E> {
                Err(E::custom(
                    "a secret (`bearer`, a header's or query parameter's value, a Kafka secret property) is never written in the config: use `{ env = \"VARIABLE\" }` or `{ file = \"path\" }`",
                ))
            }
        }
        d.deserialize_any(Fields)
    }
}

/// Whether validating a config reads the REST APIs' secrets (`bearer`, `[[…header]]`,
/// `[[…query]]`). Kafka's `secret_properties` are read either way: every command but
/// `compact` reaches the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiSecrets {
    /// Read every one; one that cannot be read (its variable unset, its file missing)
    /// refuses the config. For every command that talks to a source or target API.
    Required,
    /// Read those that can be read, so that what the command prints is still redacted of
    /// them, and leave the others out without an error. For commands that never talk to
    /// an API (`status`, `plan`, `log`, `replay`, `compact`): an on-call person reading
    /// the lag needs neither side's token. Every secret source must still be well-formed.
    IfAvailable,
}

impl SecretSource {
    /// Checks that exactly one of `env` and `file` is set, without reading anything.
    pub fn check(&self, what: &str) -> Result<(), String> {
        match (&self.env, &self.file) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(format!(
                "{what}: set exactly one of `env` (a variable name) or `file` (a path); secrets are never written in the config"
            )),
        }
    }

    /// Reads the secret as `mode` says: `None` when it is not required and cannot be read.
    pub fn resolve_as(
        &self,
        base: &Path,
        what: &str,
        mode: ApiSecrets,
    ) -> Result<Option<Secret>, String> {
        match mode {
            ApiSecrets::Required => self.resolve(base, what).map(Some),
            ApiSecrets::IfAvailable => {
                self.check(what)?;
                Ok(self.resolve(base, what).ok())
            }
        }
    }

    /// Reads the secret, without the whitespace around it (the newline that ends a file,
    /// or that `export VAR=$(cat file)` or a secrets manager leaves in a variable): a
    /// token never starts or ends with a space, and a line break would make an invalid
    /// header. One that is empty then is refused. The error names the variable or file,
    /// never the value. Every value read is remembered for redaction
    /// ([`crate::http::remember_secret`]).
    pub fn resolve(&self, base: &Path, what: &str) -> Result<Secret, String> {
        self.check(what)?;
        let (raw, from) = match (&self.env, &self.file) {
            (Some(var), None) => {
                let from = format!("environment variable `{var}`");
                match std::env::var(var) {
                    Ok(v) => (v, from),
                    Err(std::env::VarError::NotPresent) => {
                        return Err(format!(
                            "{what}: {from} is not set (export it before starting tidemark)"
                        ))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(format!("{what}: {from} is not valid UTF-8"))
                    }
                }
            }
            (None, Some(file)) => {
                let path = base.join(file);
                let raw = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
                (raw, path.display().to_string())
            }
            _ => unreachable!("checked above"),
        };
        let value = raw.trim();
        if value.is_empty() {
            return Err(format!(
                "{what}: {from} is empty{}; put the secret in it",
                if raw.is_empty() {
                    ""
                } else {
                    " but for whitespace"
                }
            ));
        }
        crate::http::remember_secret(value);
        Ok(Secret(value.to_owned()))
    }
}

/// A request header or query parameter whose value is a secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "SecretParamFields")]
pub struct HeaderConfig {
    /// Header or parameter name, e.g. `X-Api-Key` or `api_key`.
    pub name: String,
    /// Where its value comes from.
    pub value: SecretSource,
}

/// The table a [`HeaderConfig`] is written as: `name` and one of `env` or `file`. (A
/// flattened [`SecretSource`] would leave `env` and `file` unclaimed under
/// `deny_unknown_fields`.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretParamFields {
    name: String,
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    file: Option<PathBuf>,
    /// Refused, unread: a value written in the config.
    #[serde(default)]
    value: Option<serde::de::IgnoredAny>,
}

impl TryFrom<SecretParamFields> for HeaderConfig {
    type Error = String;
    fn try_from(f: SecretParamFields) -> Result<HeaderConfig, String> {
        if f.value.is_some() {
            return Err(format!(
                "the value of `{}` is a secret and is never written in the config: use `env = \"VARIABLE\"` or `file = \"path\"`",
                f.name
            ));
        }
        Ok(HeaderConfig {
            name: f.name,
            value: SecretSource {
                env: f.env,
                file: f.file,
            },
        })
    }
}

/// What every HTTP side shares: where, how to authenticate, how patiently.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpEndpointConfig {
    /// Base URL every path is joined to, e.g. `https://api.dev.example.com/v1`.
    pub base_url: String,
    /// Bearer token sent as `Authorization: Bearer …`.
    #[serde(default)]
    pub bearer: Option<SecretSource>,
    /// Further headers with secret values (API keys).
    #[serde(default, rename = "header")]
    pub headers: Vec<HeaderConfig>,
    /// Query parameters with secret values (APIs that take a key only in the URL), added
    /// to every request and shown as `***` wherever a URL is reported.
    #[serde(default, rename = "query")]
    pub queries: Vec<HeaderConfig>,
    /// Time limit of one request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long one request keeps being retried (connect errors, timeouts, 408, 429, 5xx)
    /// before the failure is reported.
    #[serde(default = "default_retry_budget", with = "humantime_serde")]
    pub retry_budget: Duration,
    /// Requests in flight at once.
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// Requests started per second; 0 means no limit.
    #[serde(default)]
    pub rate_limit: f64,
    /// Secret headers resolved at validation (name, value); empty until then, and
    /// without those that could not be read when they were not required
    /// ([`ApiSecrets::IfAvailable`]).
    #[serde(skip)]
    pub resolved_headers: Vec<(String, Secret)>,
    /// Secret query parameters resolved at validation (name, value), as the headers.
    #[serde(skip)]
    pub resolved_queries: Vec<(String, Secret)>,
}

/// Query parameter names that carry credentials. A URL in the config with one of them
/// would keep the secret in the file and show it wherever the URL is reported.
fn credential_like(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_lowercase();
    [
        "token",
        "secret",
        "passw",
        "apikey",
        "accesskey",
        "privatekey",
        "signature",
        "credential",
        "authorization",
    ]
    .iter()
    .any(|w| n.contains(w))
        || matches!(
            n.as_str(),
            "key" | "auth" | "sig" | "pwd" | "session" | "sessionid" | "sid"
        )
}

/// Refuses a URL or path from the config whose query string names a credential. `what`
/// says where it is; the value is never repeated.
pub fn check_no_credentials(url: &str, what: &str) -> Result<(), String> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    for pair in query.split('&') {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if credential_like(name) {
            return Err(format!(
                "{what} has `{name}` in its query string, which looks like a credential; secrets never go in the config: use [[…query]] with name = \"{name}\" and env = \"VAR\" or file = \"PATH\" (or a header)"
            ));
        }
    }
    Ok(())
}

/// A URL from the config as an error may quote it, the user name and password and the
/// values of its query and fragment parameters shown as `***`: read from the text, since
/// it is quoted because it does not parse (or is not http). Whatever comes before the
/// last `@` after the scheme goes, before the query and fragment are split off: the
/// password may hold `/`, `?` or `#` (`https://u:pa#ss@host`), and an `@` in a query
/// value costs the host too, never the secret.
fn shown_url(url: &str) -> String {
    let scheme_end = url
        .find(':')
        .filter(|&i| {
            url[..i]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        })
        .map_or(0, |i| i + 1);
    let (scheme, after) = url.split_at(scheme_end);
    let slashes = after.len() - after.trim_start_matches(['/', '\\']).len();
    let (slashes, rest) = after.split_at(slashes);
    let mut out = format!("{scheme}{slashes}");
    let rest = match rest.rfind('@') {
        Some(at) => {
            out.push_str("***");
            &rest[at..]
        }
        None => rest,
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    out.push_str(head);
    let values = |params: &str| {
        params
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}=***"),
                None if pair.is_empty() => String::new(),
                None => "***".to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    if let Some(q) = query {
        out.push_str(&format!("?{}", values(q)));
    }
    if let Some(f) = fragment {
        out.push_str(&format!("#{}", values(f)));
    }
    out
}

impl HttpEndpointConfig {
    /// Checks the URL and resolves the secrets as `secrets` says. The error says what to
    /// fix.
    pub fn validate(&mut self, base: &Path, secrets: ApiSecrets) -> Result<(), Refused> {
        let url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| format!("base_url `{}` is not a URL: {e}", shown_url(&self.base_url)))
            .map_err(At::Key("base_url").refuse())?;
        // Decided on the URL as parsed, which is what the client sends: the parser takes
        // `http:/u:p@host`, `https:u:p@host` and `https:\\u:p@host` as `user:p@host` too.
        // A user name or password is never repeated, not even in this error.
        if !url.username().is_empty() || url.password().is_some_and(|p| !p.is_empty()) {
            return Err(At::Key("base_url").refuse()("base_url carries a user name or password (`user:…@host`); secrets never go in the config: use `bearer`, or a [[…header]] named Authorization, with env = \"VAR\" or file = \"PATH\"".into()));
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(At::Key("base_url").refuse()(format!(
                "base_url `{}` must be http or https",
                shown_url(&self.base_url)
            )));
        }
        check_no_credentials(&self.base_url, "base_url").map_err(At::Key("base_url").refuse())?;
        for (value, key, why) in [
            (
                self.timeout,
                "timeout",
                "it is the time limit of one request, and at 0 every request would time out",
            ),
            (
                self.retry_budget,
                "retry_budget",
                "it is how long a request that meets a timeout, a 429 or a 5xx is retried, and at 0 the first such answer would end the run",
            ),
        ] {
            if value.is_zero() {
                return Err(At::Key(key).refuse()(format!(
                    "{key} must be more than 0s: {why}"
                )));
            }
        }
        if self.in_flight == 0 {
            return Err(At::Key("in_flight").refuse()(
                "in_flight must be at least 1".into(),
            ));
        }
        if self.rate_limit < 0.0 {
            return Err(At::Key("rate_limit").refuse()(
                "rate_limit cannot be negative".into(),
            ));
        }
        self.resolved_headers.clear();
        if let Some(b) = &self.bearer {
            let token = b
                .resolve_as(base, "bearer", secrets)
                .map_err(At::Key("bearer").refuse())?;
            if let Some(token) = token {
                let value = Secret(format!("Bearer {}", token.0));
                check_header_value(&value, "bearer", b, secrets)
                    .map_err(At::Key("bearer").refuse())?;
                self.resolved_headers.push(("authorization".into(), value));
            }
        }
        for (i, h) in self.headers.iter().enumerate() {
            let what = format!("header `{}`", h.name);
            if reqwest::header::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                return Err(At::Entry("header", i).refuse()(format!(
                    "{what}: that is not a valid HTTP header name"
                )));
            }
            let v = h
                .value
                .resolve_as(base, &what, secrets)
                .map_err(At::Entry("header", i).refuse())?;
            if let Some(v) = v {
                crate::http::remember_credentials_in(v.expose());
                check_header_value(&v, &what, &h.value, secrets)
                    .map_err(At::Entry("header", i).refuse())?;
                self.resolved_headers.push((h.name.clone(), v));
            }
        }
        self.resolved_queries.clear();
        for (i, q) in self.queries.iter().enumerate() {
            let at = At::Entry("query", i);
            if q.name.is_empty() || q.name.contains(['&', '=', '?', '#']) {
                return Err(at.refuse()(format!(
                    "query parameter name `{}` is not valid",
                    q.name
                )));
            }
            let v = q
                .value
                .resolve_as(base, &format!("query parameter `{}`", q.name), secrets)
                .map_err(at.refuse())?;
            self.resolved_queries.extend(v.map(|v| (q.name.clone(), v)));
        }
        Ok(())
    }
}

impl HttpEndpointConfig {
    /// The API `base_url` names, written one way: scheme and host in lower case, without
    /// a default port or a trailing slash; the query, if any, as written. Two sides with
    /// the same one are the same API. `None` for a URL that does not parse (refused by
    /// [`HttpEndpointConfig::validate`]).
    pub fn api(&self) -> Option<String> {
        let url = reqwest::Url::parse(&self.base_url).ok()?;
        let port = url.port().map_or(String::new(), |p| format!(":{p}"));
        let query = url.query().map_or(String::new(), |q| format!("?{q}"));
        Some(format!(
            "{}://{}{port}{}{query}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.path().trim_end_matches('/'),
        ))
    }
}

/// Refuses a header value the HTTP client could not send (it would leave the header out
/// of every request, with a warning): one with a line break or another control
/// character in it. Names where the value came from, never the value. Only a secret the
/// command needs is checked ([`ApiSecrets::Required`]).
fn check_header_value(
    value: &Secret,
    what: &str,
    from: &SecretSource,
    secrets: ApiSecrets,
) -> Result<(), String> {
    if secrets == ApiSecrets::Required
        && reqwest::header::HeaderValue::from_str(value.expose()).is_err()
    {
        let from = match (&from.env, &from.file) {
            (Some(var), _) => format!("environment variable `{var}`"),
            (_, Some(file)) => format!("file {}", file.display()),
            _ => "its source".into(),
        };
        return Err(format!(
            "{what}: the value in {from} cannot be sent in an HTTP header: it holds a line break, another control character or a character outside ASCII"
        ));
    }
    Ok(())
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retry_budget() -> Duration {
    Duration::from_secs(60)
}
fn default_in_flight() -> usize {
    16
}

/// How a list endpoint pages.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "style", rename_all = "lowercase", deny_unknown_fields)]
pub enum Pagination {
    /// One response holds everything.
    None,
    /// Page number and page size parameters (json-server: `_page`, `_limit`). A total
    /// count header (`X-Total-Count`) lets later pages be fetched concurrently, and a
    /// listing that ends short of it (a first page shorter than `size` while the total
    /// says more: the API caps its page size) is a listing error. Without one, a page
    /// shorter than `size` ends the listing.
    Page {
        /// Page number parameter.
        #[serde(default = "default_page_param")]
        page_param: String,
        /// Page size parameter.
        #[serde(default = "default_size_param")]
        size_param: String,
        /// Items per page; at least 1.
        #[serde(default = "default_page_size")]
        size: usize,
        /// Number of the first page.
        #[serde(default = "one")]
        first: usize,
        /// Response header with the total number of items, when the API sends one.
        #[serde(default = "default_total_header")]
        total_header: String,
    },
    /// Offset and limit parameters. The offset moves by the items each answer held. With
    /// a total count header, the listing goes on until it has that many items (or an
    /// answer holds none: then, short of the total, it is a listing error); without one,
    /// an answer shorter than `size` ends it.
    Offset {
        /// Offset parameter.
        #[serde(default = "default_offset_param")]
        offset_param: String,
        /// Limit parameter.
        #[serde(default = "default_limit_param")]
        limit_param: String,
        /// Items per request; at least 1.
        #[serde(default = "default_page_size")]
        size: usize,
        /// Response header with the total number of items, when the API sends one.
        #[serde(default = "default_total_header")]
        total_header: String,
    },
    /// The next page's URL in a `Link: <…>; rel="next"` header.
    Link,
    /// A cursor in the response body, sent back as a parameter.
    Cursor {
        /// JSON pointer of the next cursor in the response; absent, null or "" ends it.
        cursor_pointer: String,
        /// Parameter the cursor is sent in.
        cursor_param: String,
    },
}

fn default_page_param() -> String {
    "_page".into()
}
fn default_size_param() -> String {
    "_limit".into()
}
fn default_offset_param() -> String {
    "offset".into()
}
fn default_limit_param() -> String {
    "limit".into()
}
fn default_page_size() -> usize {
    100
}
fn default_total_header() -> String {
    "x-total-count".into()
}
fn one() -> usize {
    1
}
fn default_pagination() -> Pagination {
    Pagination::None
}

impl Pagination {
    /// Refuses a `size` of 0, on the kind at `index` (named `kind`): a page of no items
    /// reads nothing, and the API would answer with its default page size or an error.
    fn check(&self, index: usize, kind: &str) -> Result<(), Refused> {
        match self {
            Pagination::Page { size: 0, .. } | Pagination::Offset { size: 0, .. } => {
                Err(At::Pagination(index, "size").refuse()(format!(
                    "kind `{kind}`: pagination `size` must be at least 1: it is the number of items asked for per page (keep it within the API's maximum page size)"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// A reference field and the kind it points to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefConfig {
    /// JSON pointer of the field; an array there holds several ids.
    pub field: String,
    /// Kind of the items it references.
    pub kind: String,
    /// Whether every item of the kind may lack the field. Off by default: a scan in which
    /// no item of the kind has it is degraded, as a mistyped pointer (`/userid` for
    /// `/userId`) would otherwise send the source's ids to the target unmapped.
    #[serde(default)]
    pub optional: bool,
}

/// `[[pipeline.source.http.kind]]`: how to list one resource kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceKindConfig {
    /// Kind name (labels events and metrics).
    pub name: String,
    /// List path relative to the base URL, e.g. `/users`.
    pub path: String,
    /// How the list pages.
    #[serde(default = "default_pagination")]
    pub pagination: Pagination,
    /// JSON pointer of the items array in a list response; empty for a top-level array.
    #[serde(default)]
    pub items: String,
    /// JSON pointer of the id in an item.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// JSON pointer of the natural key used to adopt existing target items.
    #[serde(default)]
    pub name_field: Option<String>,
    /// Detail path with `{id}`, for APIs whose list returns summaries.
    #[serde(default)]
    pub detail_path: Option<String>,
    /// JSON pointers of fields left out of the body and the checksum (timestamps, etags).
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Reference fields.
    #[serde(default, rename = "ref")]
    pub refs: Vec<RefConfig>,
    /// Whether a scan asks the source for each item its listing no longer shows before
    /// it deletes it (true: a live item that pages shifting hid is kept). Set false for a
    /// `path` that filters items out (`/users?active=true`): an item that left the filter
    /// must go from the mirror although the source still answers for it.
    #[serde(default = "default_true")]
    pub confirm_deletes: bool,
}

fn default_true() -> bool {
    true
}

fn default_id_field() -> String {
    "/id".into()
}

/// `[pipeline.source.http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// Where and how.
    #[serde(flatten)]
    pub endpoint: HttpEndpointConfig,
    /// The kinds listed, in dependency order when that matters to a reader.
    #[serde(rename = "kind")]
    pub kinds: Vec<SourceKindConfig>,
}

/// How the target treats an existing item with the same name.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Take it over (update it when its content differs).
    #[default]
    Adopt,
    /// Fail the event with a clear error (an identical item is still adopted, which is
    /// what makes a crash between a create and its commit safe).
    Abort,
}

/// Which method updates an item.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum UpdateMethod {
    /// Replace the item.
    #[default]
    Put,
    /// Merge into the item.
    Patch,
}

/// `[[pipeline.target.http.kind]]`: how to write one resource kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetKindConfig {
    /// Kind name, as the source names it.
    pub name: String,
    /// Collection path: POST creates here; `verify` lists here.
    pub path: String,
    /// Item path with `{id}` (PUT/PATCH/DELETE); default `{path}/{id}`.
    #[serde(default)]
    pub item_path: Option<String>,
    /// Find-by-name query with `{name}`, e.g. `/users?name={name}`; results are matched
    /// by exact name. The API must filter by it: an answer holding an item whose name does
    /// not contain the one asked for (an API that ignores the query) fails the item
    /// instead of creating it. Without it nothing is adopted.
    #[serde(default)]
    pub find: Option<String>,
    /// JSON pointer of the name in target items.
    #[serde(default = "default_name_field")]
    pub name_field: String,
    /// JSON pointer of the id in target items and create responses.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// JSON pointer of the items array in list and find responses; empty for a top-level array.
    #[serde(default)]
    pub items: String,
    /// How the collection pages, for `verify` and `prefetch_names`.
    #[serde(default = "default_pagination")]
    pub pagination: Pagination,
    /// List the whole collection once per batch (at its first create) and adopt by name
    /// from that listing, instead of one `find` request before every create: a create
    /// then costs one request instead of two. Right for initial migrations and small
    /// collections; wrong for huge ones, which are listed in full after every batch.
    /// Needs `find` (without it nothing is adopted) and a `pagination` that reaches every
    /// item: an incomplete listing would let a create duplicate an item it missed.
    #[serde(default)]
    pub prefetch_names: bool,
    /// Server-managed fields stripped before every write and ignored when comparing.
    #[serde(default = "default_strip")]
    pub strip: Vec<String>,
}

fn default_name_field() -> String {
    "/name".into()
}
fn default_strip() -> Vec<String> {
    vec!["/id".into()]
}

impl TargetKindConfig {
    /// The item path for a target id.
    pub fn item_path(&self, id: &str) -> String {
        match &self.item_path {
            Some(p) => p.replace("{id}", id),
            None => format!("{}/{id}", self.path.trim_end_matches('/')),
        }
    }
}

/// `[pipeline.target.http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTargetConfig {
    /// Where and how.
    #[serde(flatten)]
    pub endpoint: HttpEndpointConfig,
    /// Apply deletes (DELETE). Off by default: deletes are recorded, not applied.
    #[serde(default)]
    pub prune: bool,
    /// What to do when an item with the same name already exists.
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// PUT (replace) or PATCH (merge) for updates.
    #[serde(default)]
    pub update_method: UpdateMethod,
    /// How long an event waits for the items it references before it fails.
    #[serde(default = "default_reference_wait", with = "humantime_serde")]
    pub reference_wait: Duration,
    /// The kinds written.
    #[serde(rename = "kind")]
    pub kinds: Vec<TargetKindConfig>,
}

fn default_reference_wait() -> Duration {
    Duration::from_secs(300)
}

/// What the validation of an HTTP source or target refuses, and where: a config error
/// names the line and key to edit.
#[derive(Debug)]
pub struct Refused {
    /// What is wrong and what to do.
    pub message: String,
    /// The key in the side's `http` table the message is about.
    pub at: At,
}

/// Where in a side's `http` table a [`Refused`] points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The table as a whole.
    Table,
    /// One of the endpoint's own keys (`base_url`, `bearer`, `in_flight`, …).
    Key(&'static str),
    /// One `[[…header]]` or `[[…query]]` entry, by its array and index.
    Entry(&'static str, usize),
    /// A key inside one `[[…kind]]`, with that kind's index.
    Kind(usize, &'static str),
    /// A key inside the `pagination` table of one `[[…kind]]`, with that kind's index.
    Pagination(usize, &'static str),
}

impl From<String> for Refused {
    fn from(message: String) -> Refused {
        Refused {
            message,
            at: At::Table,
        }
    }
}

impl At {
    /// Turns a message about this key into a [`Refused`] that says so.
    fn refuse(self) -> impl Fn(String) -> Refused {
        move |message| Refused { message, at: self }
    }
}

/// Turns a message about `key` of the kind at `index` into a [`Refused`] that says so.
fn in_kind(index: usize, key: &'static str) -> impl Fn(String) -> Refused {
    At::Kind(index, key).refuse()
}

/// Refuses a kind named like an earlier one, on the later one's `name`: events, the
/// remap table and references know a kind by its name alone, so two `users` would be
/// one kind listed or written twice. `side` is `source` or `target`, for the message.
fn check_unique_names<'a>(
    names: impl IntoIterator<Item = &'a str>,
    side: &str,
) -> Result<(), Refused> {
    let mut seen: Vec<&str> = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        if let Some(first) = seen.iter().position(|n| *n == name) {
            return Err(in_kind(i, "name")(format!(
                "kind `{name}` is configured twice (the {} and the {} [[…{side}.http.kind]]): events, references and the remap of ids know a kind by its name alone, so keep one of them",
                ordinal(first + 1),
                ordinal(i + 1)
            )));
        }
        seen.push(name);
    }
    Ok(())
}

/// `1st`, `2nd`, `3rd`, `4th`, … `11th`, `21st`.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn check_pointer(p: &str, what: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{what} `{p}` must be a JSON pointer such as `/{p}`"
        ))
    }
}

impl HttpSourceConfig {
    /// Validates the kinds and resolves the secrets as `secrets` says.
    pub fn validate(&mut self, base: &Path, secrets: ApiSecrets) -> Result<(), Refused> {
        self.endpoint.validate(base, secrets)?;
        if self.kinds.is_empty() {
            return Err(String::from("no [[…source.http.kind]] is configured").into());
        }
        check_unique_names(self.kinds.iter().map(|k| k.name.as_str()), "source")?;
        for (i, k) in self.kinds.iter().enumerate() {
            check_no_credentials(&k.path, &format!("kind `{}`: path", k.name))
                .map_err(in_kind(i, "path"))?;
            if let Some(d) = &k.detail_path {
                check_no_credentials(d, &format!("kind `{}`: detail_path", k.name))
                    .map_err(in_kind(i, "detail_path"))?;
            }
            check_pointer(&k.items, "items").map_err(in_kind(i, "items"))?;
            k.pagination.check(i, &k.name)?;
            check_pointer(&k.id_field, "id_field").map_err(in_kind(i, "id_field"))?;
            if let Some(n) = &k.name_field {
                check_pointer(n, "name_field").map_err(in_kind(i, "name_field"))?;
            }
            for p in &k.ignore {
                check_pointer(p, "ignore").map_err(in_kind(i, "ignore"))?;
            }
            for r in &k.refs {
                check_pointer(&r.field, "ref field").map_err(in_kind(i, "ref"))?;
                if !self.kinds.iter().any(|o| o.name == r.kind) {
                    return Err(in_kind(i, "ref")(format!(
                        "kind `{}`: ref `{}` points to kind `{}`, which is not configured",
                        k.name, r.field, r.kind
                    )));
                }
            }
            if let Some(d) = &k.detail_path {
                if !d.contains("{id}") {
                    return Err(in_kind(i, "detail_path")(format!(
                        "kind `{}`: detail_path must contain `{{id}}`",
                        k.name
                    )));
                }
            }
        }
        Ok(())
    }
}

impl HttpTargetConfig {
    /// Validates the kinds and resolves the secrets as `secrets` says.
    pub fn validate(&mut self, base: &Path, secrets: ApiSecrets) -> Result<(), Refused> {
        self.endpoint.validate(base, secrets)?;
        check_unique_names(self.kinds.iter().map(|k| k.name.as_str()), "target")?;
        for (i, k) in self.kinds.iter().enumerate() {
            for (url, what) in [
                (Some(&k.path), "path"),
                (k.item_path.as_ref(), "item_path"),
                (k.find.as_ref(), "find"),
            ] {
                if let Some(u) = url {
                    check_no_credentials(u, &format!("kind `{}`: {what}", k.name))
                        .map_err(in_kind(i, what))?;
                }
            }
            k.pagination.check(i, &k.name)?;
            check_pointer(&k.id_field, "id_field").map_err(in_kind(i, "id_field"))?;
            check_pointer(&k.name_field, "name_field").map_err(in_kind(i, "name_field"))?;
            for s in &k.strip {
                check_pointer(s, "strip").map_err(in_kind(i, "strip"))?;
            }
        }
        Ok(())
    }

    /// The config of one kind.
    pub fn kind(&self, name: &str) -> Option<&TargetKindConfig> {
        self.kinds.iter().find(|k| k.name == name)
    }
}
