//! The HTTP client the REST source and target share: secret headers, retries with
//! exponential backoff and jitter (honouring `Retry-After`) within a bounded budget, a
//! requests-per-second limit, a limit on requests in flight, requests only to `base_url`'s
//! origin (the credentials go nowhere else), redaction of secrets from every message, and
//! the request and retry metrics.

use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use tokio::sync::{Mutex, Semaphore};
use tracing::debug;

use crate::http_config::HttpEndpointConfig;
use crate::metrics::metrics;

/// Characters of a response body quoted in an error.
const EXCERPT: usize = 200;

/// A request failed for good.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server refused the request (4xx other than 408 and 429): retrying cannot help.
    #[error("{method} {url}: HTTP {status}: {excerpt}")]
    Rejected {
        /// Method.
        method: Method,
        /// URL (never holds a secret: credentials travel in headers).
        url: String,
        /// Status code.
        status: u16,
        /// Start of the response body, secrets redacted.
        excerpt: String,
    },
    /// The URL is on another origin than `base_url`'s (a next-page link, a path that is a
    /// URL): it is not requested, since the request would carry the credentials there.
    #[error(
        "{method} {url}: not requested: it is on {origin}, not on base_url's origin {base}, and tidemark sends the credentials (bearer token, secret headers and query parameters) to base_url's origin only"
    )]
    OtherOrigin {
        /// Method.
        method: Method,
        /// URL, secrets shown as `***`.
        url: String,
        /// The URL's origin (`scheme://host[:port]`).
        origin: String,
        /// `base_url`'s origin.
        base: String,
    },
    /// The server answered with a redirect (3xx), which is not followed: it could carry
    /// the credentials to another origin, and would turn a write into a GET.
    #[error(
        "{method} {url}: HTTP {status} ({}): not followed, as tidemark follows no redirects (one could carry the credentials to another origin, and would turn a write into a GET); set base_url to the address the API answers at",
        match location { Some(l) => format!("a redirect to {l}"), None => "a redirect without a Location".to_owned() }
    )]
    Redirected {
        /// Method.
        method: Method,
        /// URL, secrets shown as `***`.
        url: String,
        /// Status code.
        status: u16,
        /// Where it redirects to (`Location`, resolved against the URL), secrets shown
        /// as `***`.
        location: Option<String>,
    },
    /// The server's TLS certificate was refused (an unknown CA, another host name, expired):
    /// it will be refused again until the certificate or the config changes, so it is not
    /// retried.
    #[error(
        "{method} {url}: the server's TLS certificate was refused (not retried: it would be refused again): {reason}"
    )]
    Certificate {
        /// Method.
        method: Method,
        /// URL, secrets shown as `***`.
        url: String,
        /// What rustls found wrong with it, and what to do.
        reason: String,
    },
    /// The server kept failing (connect error, timeout, 408, 429, 5xx) until the retry
    /// budget ran out.
    #[error(
        "{method} {url}: {message} ({GAVE_UP}{attempts} attempts in {elapsed:.1?}; {})",
        if *.answered { "the server answers, but keeps failing this request" } else { "is the server up?" }
    )]
    Unavailable {
        /// Method.
        method: Method,
        /// URL.
        url: String,
        /// The last failure, secrets redacted.
        message: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last failure was an answer (an HTTP status), not a missing one.
        answered: bool,
    },
}

impl RequestError {
    /// A give-up that counts the attempts and time of a caller's own retry loop (a create
    /// looked up and posted again), not only those of its last request.
    pub fn gave_up_after(mut self, tries: u32, spent: Duration) -> RequestError {
        if let RequestError::Unavailable {
            attempts, elapsed, ..
        } = &mut self
        {
            *attempts = (*attempts).max(tries);
            *elapsed = (*elapsed).max(spent);
        }
        self
    }

    /// The HTTP status of a rejection.
    pub fn status(&self) -> Option<u16> {
        match self {
            RequestError::Rejected { status, .. } | RequestError::Redirected { status, .. } => {
                Some(*status)
            }
            RequestError::OtherOrigin { .. }
            | RequestError::Certificate { .. }
            | RequestError::Unavailable { .. } => None,
        }
    }

    /// Whether the request may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, RequestError::Unavailable { .. })
    }
}

/// How [`RequestError::Unavailable`] starts to count what a give-up cost.
const GAVE_UP: &str = "gave up after ";

/// `message` without the attempts and time of the give-ups it holds
/// ([`RequestError::Unavailable`]): the same outage met again gives up after other counts,
/// and is still the same outage to someone reading the log.
pub fn without_tally(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(GAVE_UP) {
        let tail = &rest[at..];
        let Some(end) = tail.find("; ") else { break };
        out.push_str(&rest[..at]);
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A successful response, read in full.
#[derive(Debug)]
pub struct Response {
    /// Status code (2xx: redirects are errors).
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The URL requested, secrets shown as `***` (for messages).
    pub url: String,
}

/// Spaces request starts out to at most `rate` per second.
struct RateLimit {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimit {
    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

enum Attempt {
    Transient {
        message: String,
        retry_after: Option<Duration>,
        /// The server may have acted on the request (its answer was lost, cut short or a
        /// 5xx other than 503): repeating a POST could do the work twice.
        ambiguous: bool,
        /// The server answered (with an HTTP status).
        answered: bool,
    },
    Rejected {
        status: u16,
        excerpt: String,
    },
    Redirected {
        status: u16,
        /// `Location`, resolved and redacted.
        location: Option<String>,
    },
    /// The server's certificate was refused: why, and what to do.
    Certificate {
        reason: String,
    },
}

/// One side's (source or target) HTTP client.
pub struct HttpClient {
    client: reqwest::Client,
    base: String,
    /// `base_url`'s origin (`scheme://host[:port]`): the only one requests, and so the
    /// credentials, go to.
    origin: String,
    headers: HeaderMap,
    /// Secret query parameters, encoded (`name=value`), added to every URL.
    query: Vec<(String, String)>,
    pipeline: String,
    side: &'static str,
    retry_budget: Duration,
    /// Bounds requests in flight; the target's `in_flight` setting.
    in_flight: Semaphore,
    rate: Option<RateLimit>,
}

impl HttpClient {
    /// A client for `cfg` (validated: secrets resolved), labelled `side` in metrics.
    pub fn new(pipeline: &str, side: &'static str, cfg: &HttpEndpointConfig) -> HttpClient {
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.resolved_headers {
            let (Ok(n), Ok(mut v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value.expose()),
            ) else {
                tracing::warn!(pipeline, side, header = %name, "header name or value is not valid HTTP; it is not sent");
                continue;
            };
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        let client = reqwest::Client::builder()
            // A redirect is an error naming its Location: followed, it could carry the
            // secret headers and query parameters to another origin (reqwest drops only
            // `Authorization` there), and a 301 or 302 turns a POST into a GET.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(cfg.in_flight.max(4))
            .build()
            .expect("the HTTP client builds");
        HttpClient {
            client,
            base: cfg.base_url.trim_end_matches('/').to_owned(),
            origin: origin_of(&cfg.base_url),
            headers,
            query: cfg
                .resolved_queries
                .iter()
                .map(|(n, v)| (encode_query_value(n), encode_query_value(v.expose())))
                .collect(),
            pipeline: pipeline.to_owned(),
            side,
            retry_budget: cfg.retry_budget,
            in_flight: Semaphore::new(cfg.in_flight),
            rate: (cfg.rate_limit > 0.0).then(|| RateLimit {
                interval: Duration::from_secs_f64(1.0 / cfg.rate_limit),
                next: Mutex::new(Instant::now()),
            }),
        }
    }

    /// `text` with every secret this process knows replaced by `***` (see [`redact_known`]).
    pub fn redact(&self, text: &str) -> String {
        redact_known(text).into_owned()
    }

    /// The absolute URL of a path (an absolute URL, such as a resolved next-page link,
    /// passes through), with the secret query parameters it does not carry yet. It may hold
    /// secrets: what is reported is [`HttpClient::shown`]. A URL on another origin than
    /// `base_url`'s is refused (the error holds its origin): requests carry the
    /// credentials, which go to `base_url`'s origin only.
    pub fn url(&self, path: &str) -> Result<String, String> {
        let absolute = ["http://", "https://"].iter().any(|scheme| {
            path.get(..scheme.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
        });
        let mut url = if absolute {
            path.to_owned()
        } else if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else {
            format!("{}/{path}", self.base)
        };
        let origin = origin_of(&url);
        if origin != self.origin {
            return Err(origin);
        }
        for (name, value) in &self.query {
            let query = url.split_once('?').map_or("", |(_, q)| q);
            if query.split('&').any(|p| p.split('=').next() == Some(name)) {
                continue;
            }
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(name);
            url.push('=');
            url.push_str(value);
        }
        Ok(url)
    }

    /// `base_url`'s origin (`scheme://host[:port]`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The URL a `Link: <link>; rel="next"` on the page at `page` (a path or URL as given to
    /// [`HttpClient::send`]) leads to: resolved against that page's URL, as RFC 8288 says.
    /// A link to another origin than `base_url`'s is an error saying it is not followed,
    /// naming that origin: the request would carry the credentials there.
    pub fn next_page(&self, page: &str, link: &str) -> Result<String, String> {
        let from = self.url(page).unwrap_or_else(|_| page.to_owned());
        let shown_page = self.shown(&from);
        let next = reqwest::Url::parse(&from)
            .and_then(|u| u.join(link))
            .map_err(|e| {
                format!(
                    "GET {shown_page}: the next page's link `{}` is not a URL ({e})",
                    self.shown(link)
                )
            })?;
        let origin = origin_of(next.as_str());
        if origin != self.origin {
            return Err(format!(
                "GET {shown_page}: the next page's link (`Link: <{}>; rel=\"next\"`) leads to {origin}, not to base_url's origin {}: it is not followed, since tidemark sends the credentials (bearer token, secret headers and query parameters) to base_url's origin only, so this kind's listing is incomplete. Have the API link to its own origin, or set base_url to {origin} if that is where it answers",
                self.shown(link),
                self.origin
            ));
        }
        Ok(next.into())
    }

    /// A URL as reports, logs and errors show it: secrets replaced by `***`.
    pub fn shown(&self, url: &str) -> String {
        self.redact(url)
    }

    fn count(&self, class: &str) {
        metrics()
            .requests
            .with_label_values(&[&self.pipeline, self.side, class])
            .inc();
    }

    async fn attempt(
        &self,
        method: &Method,
        url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, Attempt> {
        if let Some(rate) = &self.rate {
            rate.wait().await;
        }
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let mut req = self
            .client
            .request(method.clone(), url)
            .headers(self.headers.clone());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.count("error");
                if let Some(reason) = certificate_refused(&e) {
                    return Err(Attempt::Certificate {
                        reason: self.redact(&reason),
                    });
                }
                return Err(Attempt::Transient {
                    message: self.redact(&describe(&e)),
                    retry_after: None,
                    ambiguous: !e.is_connect(),
                    answered: false,
                });
            }
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                self.count("error");
                return Err(Attempt::Transient {
                    message: self.redact(&format!("reading the response: {}", describe(&e))),
                    retry_after: None,
                    ambiguous: true,
                    answered: false,
                });
            }
        };
        self.count(match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        });
        if status.is_redirection() {
            let location = headers
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| {
                    let resolved = reqwest::Url::parse(url).and_then(|u| u.join(l));
                    self.shown(resolved.as_ref().map_or(l, |u| u.as_str()))
                });
            return Err(Attempt::Redirected {
                status: status.as_u16(),
                location,
            });
        }
        if status.is_success() {
            return Ok(Response {
                status: status.as_u16(),
                headers,
                body: bytes,
                url: self.shown(url),
            });
        }
        let excerpt = self.excerpt(&bytes);
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            return Err(Attempt::Transient {
                message: format!("HTTP {}: {excerpt}", status.as_u16()),
                retry_after,
                // 408, 429 and 503 say the request was not processed.
                ambiguous: status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE,
                answered: true,
            });
        }
        Err(Attempt::Rejected {
            status: status.as_u16(),
            excerpt,
        })
    }

    /// The start of a response body for a message: see [`excerpt`].
    fn excerpt(&self, body: &[u8]) -> String {
        let cut = excerpt(&String::from_utf8_lossy(body), EXCERPT, "…");
        if cut.is_empty() {
            return "(empty body)".to_owned();
        }
        cut
    }

    /// Sends one request, retrying transient failures with exponential backoff and jitter
    /// (at least as long as `Retry-After` asks) until the retry budget is spent. A POST is
    /// repeated only when the server provably did not act on it (no connection, 408, 429,
    /// 503); otherwise it fails at once with [`RequestError::Unavailable`], so the caller
    /// can look for what the lost attempt created before creating again.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Response, RequestError> {
        let url = match self.url(path) {
            Ok(url) => url,
            Err(origin) => {
                return Err(RequestError::OtherOrigin {
                    method,
                    url: self.shown(path),
                    origin,
                    base: self.origin.clone(),
                })
            }
        };
        let shown = self.shown(&url);
        let started = Instant::now();
        let mut backoff = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(100))
            .with_randomization_factor(0.5)
            .with_multiplier(2.0)
            .with_max_interval(Duration::from_secs(10))
            .with_max_elapsed_time(Some(self.retry_budget))
            .build();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(&method, &url, body).await {
                Ok(r) => return Ok(r),
                Err(Attempt::Rejected { status, excerpt }) => {
                    let excerpt = match status {
                        401 => format!(
                            "{excerpt} (the {} API refused the credentials: check the {} token (`bearer`) and secret headers or query parameters in the config, and that the variable or file they name holds a valid one)",
                            self.side, self.side
                        ),
                        403 => format!(
                            "{excerpt} (the {} API refused this request: check that its token may {method} there)",
                            self.side
                        ),
                        _ => excerpt,
                    };
                    return Err(RequestError::Rejected {
                        method,
                        url: shown,
                        status,
                        excerpt,
                    });
                }
                Err(Attempt::Redirected { status, location }) => {
                    return Err(RequestError::Redirected {
                        method,
                        url: shown,
                        status,
                        location,
                    });
                }
                Err(Attempt::Certificate { reason }) => {
                    return Err(RequestError::Certificate {
                        method,
                        url: shown,
                        reason,
                    });
                }
                Err(Attempt::Transient {
                    message,
                    retry_after,
                    ambiguous,
                    answered,
                }) => {
                    let give_up = |message| RequestError::Unavailable {
                        method: method.clone(),
                        url: shown.clone(),
                        message,
                        attempts,
                        elapsed: started.elapsed(),
                        answered,
                    };
                    if ambiguous && method == Method::POST {
                        return Err(give_up(format!(
                            "{message}; the server may have acted on it, so it is not repeated blindly"
                        )));
                    }
                    let Some(mut delay) = backoff.next_backoff() else {
                        return Err(give_up(message));
                    };
                    if let Some(ra) = retry_after {
                        delay = delay.max(ra);
                    }
                    if started.elapsed() + delay > self.retry_budget {
                        return Err(give_up(match retry_after {
                            Some(ra) if ra == delay => format!(
                                "{message}; it asked to be retried in {} (Retry-After), past the {} retry_budget: a retry_budget above that lets tidemark wait for it",
                                humantime::format_duration(ra),
                                humantime::format_duration(self.retry_budget)
                            ),
                            _ => message,
                        }));
                    }
                    metrics()
                        .retries
                        .with_label_values(&[&self.pipeline, self.side])
                        .inc();
                    debug!(
                        pipeline = %self.pipeline,
                        side = self.side,
                        %method,
                        url = %shown,
                        attempt = attempts,
                        delay_ms = delay.as_millis() as u64,
                        "retrying: {message}"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The time a request may spend on retries.
    pub fn retry_budget(&self) -> Duration {
        self.retry_budget
    }

    /// Counts a retry made by a caller (a create looked up again before its next POST).
    pub fn count_retry(&self) {
        metrics()
            .retries
            .with_label_values(&[&self.pipeline, self.side])
            .inc();
    }

    /// Sends a request and parses the response as JSON. A body that is not JSON is an
    /// [`RequestError::Rejected`] naming the URL.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(Response, serde_json::Value), RequestError> {
        let resp = self.send(method.clone(), path, body).await?;
        if resp.body.is_empty() {
            return Ok((resp, serde_json::Value::Null));
        }
        match serde_json::from_slice(&resp.body) {
            Ok(v) => Ok((resp, v)),
            Err(e) => Err(RequestError::Rejected {
                method,
                url: resp.url.clone(),
                status: resp.status,
                excerpt: format!(
                    "response is not valid JSON ({e}): {}",
                    self.excerpt(&resp.body)
                ),
            }),
        }
    }
}

/// Every secret this process has read (tokens, header values, query keys, Kafka
/// passwords, the `/status` token), in every form [`secret_forms`] gives, longest first so
/// a token inside `Bearer <token>` goes as a whole. Redaction covers all of them whatever a
/// text comes from: one connector's error can quote another's secret, as when a target
/// rejects an item whose links carry the key the source was read with.
static KNOWN: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Adds a secret, in every form an API may quote it in ([`secret_forms`]), to those every
/// message, log line, report and output is redacted of. Forms shorter than 4 bytes are
/// not: they would blank out ordinary words.
pub fn remember_secret(secret: &str) {
    let mut known = KNOWN.write().unwrap_or_else(|e| e.into_inner());
    for form in secret_forms(secret) {
        if form.len() >= 4 && !known.contains(&form) {
            known.push(form);
        }
    }
    known.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
}

/// Adds what a secret header's value (already remembered whole by
/// [`crate::http_config::SecretSource::resolve`]) holds that an API may quote on its own:
/// the credential after its scheme (`Token <key>`, `Basic <base64>`), and for `Basic` the
/// `user:password` it encodes and the password alone. A password shorter than 4 bytes is
/// left out as every such form is ([`remember_secret`]).
pub fn remember_credentials_in(header_value: &str) {
    for part in credentials_in(header_value) {
        remember_secret(&part);
    }
}

/// The parts of a header value [`remember_credentials_in`] remembers: none when it does not
/// start with an authentication scheme (a token of letters, digits and `-._~+`) and a space.
fn credentials_in(header_value: &str) -> Vec<String> {
    use base64::Engine as _;
    let Some((scheme, credential)) = header_value.split_once(' ') else {
        return Vec::new();
    };
    let credential = credential.trim_start();
    if scheme.is_empty()
        || credential.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+".contains(&b))
    {
        return Vec::new();
    }
    let mut parts = vec![credential.to_owned()];
    if scheme.eq_ignore_ascii_case("basic") {
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        let decoded = engines
            .iter()
            .find_map(|e| e.decode(credential).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok());
        if let Some(pair) = decoded {
            if let Some((_, password)) = pair.split_once(':') {
                parts.push(password.to_owned());
            }
            parts.push(pair);
        }
    }
    parts
}

/// The forms a secret takes in what a server answers or tidemark writes: as written;
/// percent-encoded by each common encoder (as tidemark sends it in a query, as Python's
/// `quote` and `quote_plus`, a form field and JavaScript's `encodeURIComponent` write it),
/// with upper- and lower-case hex digits; and each of
/// those inside a JSON string: escaped as most encoders do (`\\`, `\"`), with `/` as `\/`
/// too (PHP's `json_encode`), with non-ASCII characters as `\uXXXX` (PHP, Python), with
/// `&`, `<` and `>` as `\u0026`, `\u003c` and `\u003e` (Go's `encoding/json`, Rails), and
/// escaped twice (an answer quoting a JSON body, a JSON log line or report quoting such an
/// answer). HTML and XML character references are not forms: [`redact`] reads them.
fn secret_forms(secret: &str) -> Vec<String> {
    let percent = |keep: &dyn Fn(u8) -> bool, space: &str, hex_lower: bool| {
        let mut out = String::with_capacity(secret.len());
        for b in secret.bytes() {
            if b.is_ascii_alphanumeric() || keep(b) {
                out.push(b as char);
            } else if b == b' ' && !space.is_empty() {
                out.push_str(space);
            } else if hex_lower {
                out.push_str(&format!("%{b:02x}"));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    };
    let unreserved = |b: u8| b"-_.~".contains(&b);
    // The characters each common encoder leaves as they are, and what it writes a space as.
    let encoders: [(&dyn Fn(u8) -> bool, &str); 5] = [
        // RFC 3986 (tidemark's own, Go's `url.QueryEscape` but for the space).
        (&unreserved, ""),
        // Python's `urllib.parse.quote`, which leaves `/` alone by default.
        (&|b| unreserved(b) || b == b'/', ""),
        // Python's `quote_plus`.
        (&unreserved, "+"),
        // HTML forms (`application/x-www-form-urlencoded`, `URLSearchParams`).
        (&|b| b"*-._".contains(&b), "+"),
        // JavaScript's `encodeURIComponent`.
        (&|b| b"-_.!~*'()".contains(&b), ""),
    ];
    let mut forms = vec![secret.to_owned()];
    for (keep, space) in encoders {
        forms.push(percent(keep, space, false));
        forms.push(percent(keep, space, true));
    }
    let json = |s: &str| {
        let quoted = serde_json::to_string(s).expect("a string serializes");
        quoted[1..quoted.len() - 1].to_owned()
    };
    let ascii = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        out
    };
    let html_safe = |s: &str| {
        s.replace('&', "\\u0026")
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
    };
    for form in forms.clone() {
        let escaped = json(&form);
        let slashes = escaped.replace('/', "\\/");
        forms.extend([
            html_safe(&escaped),
            json(&escaped),
            json(&slashes),
            json(&slashes).replace('/', "\\/"),
            ascii(&escaped),
            ascii(&slashes),
            escaped,
            slashes,
        ]);
    }
    forms.sort();
    forms.dedup();
    forms
}

/// `text` with every secret in `secrets` replaced by `***`, also where the text writes
/// some of its characters as HTML or XML character references ([`Unescaped`]).
pub fn redact(secrets: &[String], text: &str) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    match Unescaped::of(&out) {
        Some(unescaped) => unescaped.redact(secrets, &out),
        None => out,
    }
}

/// `text` with every secret the process knows ([`remember_secret`]) replaced by `***`;
/// borrowed when there is none in it.
pub fn redact_known(text: &str) -> std::borrow::Cow<'_, str> {
    let known = KNOWN.read().unwrap_or_else(|e| e.into_inner());
    let holds = |text: &str| known.iter().any(|s| text.contains(s.as_str()));
    if holds(text) || Unescaped::of(text).is_some_and(|u| holds(&u.text)) {
        std::borrow::Cow::Owned(redact(&known, text))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// A text with its HTML and XML character references read as the characters they stand
/// for: the five named ones XML has (`&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;`) and every
/// numeric one (`&#39;`, `&#039;`, `&#x27;`, `&#X27;`). An error page or an XML answer
/// quotes a secret escaped so, each escaper its own way (Python's `html.escape` writes `'`
/// as `&#x27;`, Go's `&#39;`, PHP's `&#039;`, XML's `&apos;`), so rather than each way as
/// a form of the secret, the text is read as a browser would read it, and a secret found
/// there is redacted over the stretch of the original text it came from.
struct Unescaped {
    /// The text, its references replaced by their characters.
    text: String,
    /// For each byte of `text` (and one past its end), where the character it belongs to
    /// starts in the original text.
    from: Vec<usize>,
}

impl Unescaped {
    /// `text` unescaped; `None` when it holds no character reference.
    fn of(text: &str) -> Option<Unescaped> {
        // Most texts (log lines, URLs with `&` between their parameters) hold none: no copy.
        if !text
            .match_indices('&')
            .any(|(i, _)| Self::reference(&text[i..]).is_some())
        {
            return None;
        }
        let mut rest = text;
        let mut at = 0;
        let mut out = Unescaped {
            text: String::with_capacity(text.len()),
            from: Vec::with_capacity(text.len() + 1),
        };
        while let Some(amp) = rest.find('&') {
            out.push(&rest[..amp], at);
            at += amp;
            rest = &rest[amp..];
            let (c, len) = Self::reference(rest).unwrap_or(('&', 1));
            out.push(c.encode_utf8(&mut [0; 4]), at);
            at += len;
            rest = &rest[len..];
        }
        out.push(rest, at);
        out.from.push(text.len());
        Some(out)
    }

    /// Appends `part`, which starts at `at` in the original text.
    fn push(&mut self, part: &str, at: usize) {
        for (i, c) in part.char_indices() {
            for _ in 0..c.len_utf8() {
                self.from.push(at + i);
            }
        }
        self.text.push_str(part);
    }

    /// The character the reference at the start of `text` stands for, and its length.
    fn reference(text: &str) -> Option<(char, usize)> {
        let end = text.bytes().take(12).position(|b| b == b';')?;
        let name = &text[1..end];
        let c = match name {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let number = name.strip_prefix('#')?;
                let (digits, radix) = match number.strip_prefix(['x', 'X']) {
                    Some(hex) => (hex, 16),
                    None => (number, 10),
                };
                if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                    return None;
                }
                char::from_u32(u32::from_str_radix(digits, radix).ok()?)?
            }
        };
        Some((c, end + 1))
    }

    /// `original` (the text this was made of) with each stretch that reads as one of
    /// `secrets` replaced by `***`, longest secrets first.
    fn redact(&self, secrets: &[String], original: &str) -> String {
        let mut found: Vec<(usize, usize)> = Vec::new();
        for s in secrets {
            for (i, _) in self.text.match_indices(s.as_str()) {
                let (start, end) = (self.from[i], self.from[i + s.len()]);
                if found.iter().all(|&(a, b)| end <= a || b <= start) {
                    found.push((start, end));
                }
            }
        }
        found.sort_unstable();
        let mut out = String::with_capacity(original.len());
        let mut at = 0;
        for (start, end) in found {
            out.push_str(&original[at..start]);
            out.push_str("***");
            at = end;
        }
        out.push_str(&original[at..]);
        out
    }
}

/// At most `max` characters of `text` for a message, its runs of whitespace folded to one
/// space, `ellipsis` appended where it was cut. Every known secret is replaced by `***`
/// before it is cut (cut first, a secret across the cut would leave its start, which no
/// redaction recognises any more), and the cut never splits a `***` or a character.
pub fn excerpt(text: &str, max: usize, ellipsis: &str) -> String {
    let flat = redact_known(text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let flat = redact_known(&flat).into_owned();
    let Some((mut cut, _)) = flat.char_indices().nth(max) else {
        return flat;
    };
    let bytes = flat.as_bytes();
    if bytes[cut] == b'*' {
        while cut > 0 && bytes[cut - 1] == b'*' {
            cut -= 1;
        }
    }
    format!("{}{ellipsis}", &flat[..cut])
}

/// A URL's origin as `scheme://host[:port]` (the port left out when it is the scheme's
/// default); for what is not an http or https URL, a description that matches no origin.
pub fn origin_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u.origin().ascii_serialization(),
        Ok(u) => format!("a `{}:` URL", u.scheme()),
        Err(_) => "no origin (not a URL)".to_owned(),
    }
}

/// Why the server's TLS certificate was refused, with what to do, when that is what failed:
/// rustls's verdict, found among the error's causes. hyper carries it inside `io::Error`s,
/// whose `source` skips what they wrap, so those are opened with `get_ref`.
fn certificate_refused(e: &reqwest::Error) -> Option<String> {
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return certificate_verdict(tls);
        }
        next = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    None
}

/// What a rustls error says about the server's certificate, and what to do; `None` when it
/// is about something else (a handshake cut short, a protocol error).
fn certificate_verdict(e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let hint = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => Some("it is not signed by a certificate authority this machine trusts (self-signed, or a private CA): add that CA to the system's trust store, or have the server use a certificate from a trusted one"),
            C::NotValidForName | C::NotValidForNameContext { .. } => Some("it does not name the host in base_url: set base_url to a host name the certificate is for"),
            C::Expired | C::ExpiredContext { .. } => Some("it has expired: the server needs a new one"),
            C::NotValidYet | C::NotValidYetContext { .. } => Some("it is not valid yet: check this machine's clock, and the server's certificate"),
            C::Revoked => Some("it was revoked: the server needs a new one"),
            _ => None,
        },
        rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_)
        | rustls::Error::UnsupportedNameType => None,
        _ => return None,
    };
    Some(match hint {
        Some(hint) => format!("{e}; {hint}"),
        None => e.to_string(),
    })
}

/// A transport error with its causes, which reqwest's `Display` leaves out.
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Percent-encodes a value for a query string.
pub fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// An id as a string: strings as they are, numbers in their JSON form.
pub fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header value's scheme is not the credential; `Basic` gives what it encodes.
    #[test]
    fn the_credentials_in_a_header_value_are_after_its_scheme() {
        assert_eq!(credentials_in("Token TOKHDR-key-555"), ["TOKHDR-key-555"]);
        assert_eq!(
            credentials_in("Basic c3ZjdXNlcjpCQVNJQ0NSRUQtcHctMTIz"),
            [
                "c3ZjdXNlcjpCQVNJQ0NSRUQtcHctMTIz",
                "BASICCRED-pw-123",
                "svcuser:BASICCRED-pw-123"
            ]
        );
        assert!(credentials_in("plain-key-without-scheme").is_empty());
        assert!(credentials_in("a=b c").is_empty());
    }

    /// Two give-ups of one outage read the same without their counts; another error does
    /// not.
    #[test]
    fn a_give_up_without_its_tally_is_the_same_outage() {
        let gave_up = |attempts, elapsed| {
            RequestError::Unavailable {
                method: Method::POST,
                url: "http://prod/posts".into(),
                message: "connection refused".into(),
                attempts,
                elapsed,
                answered: false,
            }
            .to_string()
        };
        let first = gave_up(3, Duration::from_millis(900));
        assert_eq!(
            without_tally(&first),
            "POST http://prod/posts: connection refused (is the server up?)"
        );
        assert_eq!(
            without_tally(&first),
            without_tally(&gave_up(9, Duration::from_secs(21)))
        );
        assert_eq!(without_tally("disk full"), "disk full");
    }

    #[test]
    fn redacts_every_secret() {
        let secrets = vec!["Bearer s3cret-token".to_owned(), "s3cret-token".to_owned()];
        assert_eq!(
            redact(&secrets, "auth: Bearer s3cret-token, again s3cret-token"),
            "auth: ***, again ***"
        );
    }

    /// A secret across the cut is redacted whole, and the cut keeps `***` whole.
    #[test]
    fn an_excerpt_is_redacted_before_it_is_cut() {
        remember_secret("xc-S3cr3t/Tok3n");
        let body = format!("{}Bearer xc-S3cr3t/Tok3n and more", "a".repeat(190));
        assert_eq!(
            excerpt(&body, 200, "…"),
            format!("{}Bearer ***…", "a".repeat(190))
        );
        assert_eq!(
            excerpt(&body, 199, "…"),
            format!("{}Bearer …", "a".repeat(190))
        );
        assert_eq!(
            excerpt(&body, 300, "…"),
            format!("{}Bearer *** and more", "a".repeat(190))
        );
        for max in 197..=199 {
            let body = format!("{}xc-S3cr3t/Tok3n{}", "a".repeat(197), "b".repeat(10));
            assert_eq!(
                excerpt(&body, max, "…"),
                format!("{}…", "a".repeat(197)),
                "{max}"
            );
        }
        // Characters, not bytes; whitespace folded.
        let body = format!("{}\n\n  ü{}", "é".repeat(10), "ü".repeat(10));
        assert_eq!(
            excerpt(&body, 12, "..."),
            format!("{} ü...", "é".repeat(10))
        );
        assert_eq!(excerpt("short", 200, "…"), "short");
    }

    #[test]
    fn a_refused_certificate_says_why_and_other_tls_errors_are_not_one() {
        let verdict = |e| certificate_verdict(&e);
        let name = verdict(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ))
        .unwrap();
        assert!(
            name.contains("NotValidForName") && name.contains("base_url"),
            "{name}"
        );
        let ca = verdict(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ))
        .unwrap();
        assert!(ca.contains("trust store"), "{ca}");
        assert!(verdict(rustls::Error::NoCertificatesPresented).is_some());
        assert_eq!(verdict(rustls::Error::HandshakeNotComplete), None);
        assert_eq!(verdict(rustls::Error::General("x".into())), None);
    }

    fn client(base_url: &str) -> HttpClient {
        let cfg: HttpEndpointConfig =
            toml::from_str(&format!("base_url = \"{base_url}\"")).unwrap();
        HttpClient::new("p", "source", &cfg)
    }

    #[test]
    fn requests_go_to_base_urls_origin_only() {
        let c = client("https://api.example.com/v1");
        assert_eq!(c.origin(), "https://api.example.com");
        assert_eq!(
            c.url("/users").as_deref(),
            Ok("https://api.example.com/v1/users")
        );
        for same in [
            "https://api.example.com/other",
            "https://API.example.com:443/v1/users?page=2",
            "HTTPS://api.example.com/v1/users",
        ] {
            assert!(c.url(same).is_ok(), "{same}");
        }
        for (other, origin) in [
            ("http://api.example.com/v1/users", "http://api.example.com"),
            (
                "https://api.example.com:8443/v1",
                "https://api.example.com:8443",
            ),
            ("https://evil.example.com/v1", "https://evil.example.com"),
            (
                "https://api.example.com.evil.net/",
                "https://api.example.com.evil.net",
            ),
        ] {
            assert_eq!(c.url(other), Err(origin.to_owned()), "{other}");
        }
        // A path is always joined to base_url, whatever it holds.
        for path in ["@evil.example.com/x", "//evil.example.com/x", ":8080/x"] {
            assert!(c
                .url(path)
                .unwrap()
                .starts_with("https://api.example.com/v1/"));
        }
    }

    #[test]
    fn a_next_page_link_is_resolved_and_kept_on_base_urls_origin() {
        let c = client("https://api.example.com/v1");
        // Resolved against the page's URL (RFC 8288), not joined to base_url again.
        assert_eq!(
            c.next_page("/users", "/v1/users?page=2").as_deref(),
            Ok("https://api.example.com/v1/users?page=2")
        );
        assert_eq!(
            c.next_page("/users?page=2", "?page=3").as_deref(),
            Ok("https://api.example.com/v1/users?page=3")
        );
        assert_eq!(
            c.next_page("/users", "https://api.example.com/v1/users?page=2")
                .as_deref(),
            Ok("https://api.example.com/v1/users?page=2")
        );
        // https → http is another origin: the credentials would travel in clear text.
        for (link, origin) in [
            (
                "http://api.example.com/v1/users?page=2",
                "http://api.example.com",
            ),
            (
                "https://cdn.example.com/users?page=2",
                "https://cdn.example.com",
            ),
            ("//cdn.example.com/users?page=2", "https://cdn.example.com"),
        ] {
            let e = c.next_page("/users", link).unwrap_err();
            assert!(
                e.contains(&format!(
                    "leads to {origin}, not to base_url's origin https://api.example.com"
                )) && e.contains("not followed"),
                "{e}"
            );
        }
    }

    /// A secret is redacted in the forms APIs quote it in, not only as written.
    #[test]
    fn redacts_the_escaped_and_encoded_forms_of_a_secret() {
        remember_secret("Ek/3y+\"q\\ü z");
        for quoted in [
            r#"raw Ek/3y+"q\ü z."#,
            r#"json {"got":"Ek/3y+\"q\\ü z"}"#,
            r#"php {"got":"Ek\/3y+\"q\\\u00fc z"}"#,
            r#"twice {"body":"{\"got\":\"Ek\\\/3y+\\\"q\\\\ü z\"}"}"#,
            r#"log {"message":"{\"got\":\"Ek\\/3y+\\\"q\\\\ü z\"}"}"#,
            "url ?k=Ek%2F3y%2B%22q%5C%C3%BC%20z&x",
            "lower ?k=Ek%2f3y%2b%22q%5c%c3%bc%20z&x",
            "form ?k=Ek%2F3y%2B%22q%5C%C3%BC+z&x",
        ] {
            let shown = redact_known(quoted);
            assert!(
                shown.contains("***") && !shown.contains("Ek") && !shown.contains("3y"),
                "{quoted} -> {shown}"
            );
        }
    }

    /// A secret holding `&`, `<`, `>`, `"` or `'` is redacted where an error page or an XML
    /// answer quotes it with character references, whichever an escaper chose, and where
    /// a JSON encoder that keeps its output safe in HTML escaped it (Go, Rails).
    #[test]
    fn redacts_a_secret_quoted_with_html_or_xml_references() {
        remember_secret("Hx&T0k\"n<9>'z");
        for quoted in [
            "python <p>Hx&amp;T0k&quot;n&lt;9&gt;&#x27;z</p>",
            "go <p>Hx&amp;T0k&#34;n&lt;9&gt;&#39;z</p>",
            "php <p>Hx&amp;T0k&quot;n&lt;9&gt;&#039;z</p>",
            "xml <detail>Hx&amp;T0k&quot;n&lt;9&gt;&apos;z</detail>",
            "numeric &#72;&#x78;&#X26;T0k&#34;n&#60;9&#62;&#39;z.",
            "partly <!-- Hx&amp;T0k\"n&lt;9>'z -->",
            r#"html of json {&quot;got&quot;:&quot;Hx&amp;T0k\&quot;n&lt;9&gt;'z&quot;}"#,
            r#"go json {"got":"Hx\u0026T0k\"n\u003c9\u003e'z"}"#,
        ] {
            let shown = redact_known(quoted);
            assert!(
                shown.contains("***") && !shown.contains("Hx") && !shown.contains("T0k"),
                "{quoted} -> {shown}"
            );
        }
        assert_eq!(
            redact_known("<p>Hx&amp;T0k&quot;n&lt;9&gt;&#x27;z</p> &amp; &#128512; &bogus; &#;"),
            "<p>***</p> &amp; &#128512; &bogus; &#;",
            "only the secret's stretch changes"
        );
        assert!(matches!(
            redact_known("Tom &amp; Jerry &lt;3 &#x27;s"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode_query_value("a b&c=ü"), "a%20b%26c%3D%C3%BC");
    }
}
