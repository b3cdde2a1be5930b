//! Shared harness for the REST connector tests (issue 3): real json-server peers started by
//! `ops/peers/json-server.sh`, a fault-injecting HTTP proxy, and the pipeline config.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{repo_root, wait_for, Env};

/// The bearer token the tests configure; it must never show up anywhere.
pub const TOKEN: &str = "tm-secret-7f3a9c1e55d04b2a";

/// A free TCP port on loopback, never one this process handed out before: the port is
/// free only until its listener is dropped, and two tests starting peers at once could
/// be given the same one, the second peer then failing to listen or, worse, the second
/// test's readiness check answered by the first test's peer.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One json-server instance, killed on drop.
pub struct JsonServer {
    child: Child,
    pub port: u16,
    pub db: std::path::PathBuf,
}

impl JsonServer {
    /// Starts json-server on a copy of `db` in `dir`, through the project's script.
    pub fn start(dir: &Path, name: &str, db: &Value) -> JsonServer {
        let file = dir.join(format!("{name}.json"));
        let script = repo_root().join("ops/peers/json-server.sh");
        // Another process (a daemon listening on port 0) may take the port between
        // `free_port` and the peer's listen, and the peer exits then (json-server says
        // nothing of it): tried again on another port.
        for attempt in 1.. {
            std::fs::write(&file, serde_json::to_vec_pretty(db).unwrap()).unwrap();
            let port = free_port();
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let child = Command::new(&script)
                .arg(&file)
                .arg(port.to_string())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start the REST peer with `{} {} {port}`: {e}",
                        script.display(),
                        file.display()
                    )
                });
            let mut server = JsonServer {
                child,
                port,
                db: file.clone(),
            };
            let up = wait_for(Duration::from_secs(120), || {
                if let Ok(Some(status)) = server.child.try_wait() {
                    return Some(Err(status));
                }
                reqwest::blocking::get(format!("http://127.0.0.1:{port}/db"))
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(Ok)
            });
            match up {
                Some(Ok(_)) => return server,
                Some(Err(_)) if attempt < 3 => continue,
                Some(Err(status)) => panic!(
                    "the REST peer exited ({status}); start it by hand to see why: `{} {} {port}`\n{}",
                    script.display(),
                    file.display(),
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
                ),
                None => panic!(
                    "the REST peer did not answer on port {port}; it is started with `{} {} {port}`",
                    script.display(),
                    file.display()
                ),
            }
        }
        unreachable!()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every item of a collection.
    pub fn all(&self, kind: &str) -> Vec<Value> {
        reqwest::blocking::get(format!("{}/{kind}", self.url()))
            .unwrap()
            .json::<Vec<Value>>()
            .unwrap()
    }

    pub fn post(&self, kind: &str, item: Value) -> Value {
        reqwest::blocking::Client::new()
            .post(format!("{}/{kind}", self.url()))
            .json(&item)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn put(&self, kind: &str, id: &Value, item: Value) {
        let r = reqwest::blocking::Client::new()
            .put(format!("{}/{kind}/{id}", self.url()))
            .json(&item)
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }

    pub fn delete(&self, kind: &str, id: &Value) {
        let r = reqwest::blocking::Client::new()
            .delete(format!("{}/{kind}/{id}", self.url()))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dev data: `users` users, 2 posts each (posts.userId), 2 comments per post
/// (comments.postId). Ids are sparse and large so prod's own ids differ from them.
pub fn dev_db(users: usize) -> Value {
    let mut u = Vec::new();
    let mut p = Vec::new();
    let mut c = Vec::new();
    for i in 0..users {
        let uid = 1000 + 7 * i;
        u.push(json!({"id": uid, "name": format!("user-{i}"), "active": i % 2 == 0, "score": 0, "bio": ""}));
        for j in 0..2 {
            let pid = 5000 + 11 * (2 * i + j);
            p.push(json!({"id": pid, "name": format!("post-{i}-{j}"), "userId": uid, "title": format!("Post {j} by {i}")}));
            for k in 0..2 {
                let cid = 90000 + 13 * (4 * i + 2 * j + k);
                c.push(json!({"id": cid, "name": format!("comment-{i}-{j}-{k}"), "postId": pid, "body": "nice"}));
            }
        }
    }
    json!({"users": u, "posts": p, "comments": c})
}

/// An empty database for the three kinds: a fresh prod.
pub fn empty_db() -> Value {
    serde_json::json!({"users": [], "posts": [], "comments": []})
}

/// Config of pipeline `t` from `dev` to `prod` for users ← posts ← comments.
/// `target_extra` goes into `[pipeline.target.http]`.
pub fn write_rest_config(env: &Env, dev: &str, prod: &str, target_extra: &str) {
    write_rest_config_with(env, dev, prod, target_extra, false)
}

/// As [`write_rest_config`]; with `cyclic`, users also reference posts (`favoritePostId`).
pub fn write_rest_config_with(env: &Env, dev: &str, prod: &str, target_extra: &str, cyclic: bool) {
    let users_ref = if cyclic { "/favoritePostId|posts" } else { "" };
    write_rest_config_users_ref(env, dev, prod, target_extra, users_ref)
}

/// As [`write_rest_config`], users with the reference `users_ref` (`/field|kind`, or none
/// when empty).
pub fn write_rest_config_users_ref(
    env: &Env,
    dev: &str,
    prod: &str,
    target_extra: &str,
    users_ref: &str,
) {
    std::fs::write(env.path("token.txt"), format!("{TOKEN}\n")).unwrap();
    let kinds_src = [("users", users_ref), ("posts", "/userId|users"), ("comments", "/postId|posts")]
        .iter()
        .map(|(k, r)| {
            let refs = if r.is_empty() {
                String::new()
            } else {
                let (field, kind) = r.split_once('|').unwrap();
                format!("\n[[pipeline.source.http.kind.ref]]\nfield = \"{field}\"\nkind = \"{kind}\"\n")
            };
            format!(
                "\n[[pipeline.source.http.kind]]\nname = \"{k}\"\npath = \"/{k}\"\nname_field = \"/name\"\npagination = {{ style = \"page\", size = 50 }}\n{refs}"
            )
        })
        .collect::<String>();
    let kinds_dst = ["users", "posts", "comments"]
        .iter()
        .map(|k| {
            format!(
                "\n[[pipeline.target.http.kind]]\nname = \"{k}\"\npath = \"/{k}\"\nfind = \"/{k}?name={{name}}\"\npagination = {{ style = \"page\", size = 100 }}\n"
            )
        })
        .collect::<String>();
    env.write_config(&format!(
        r#"state_dir = "state"
listen = "127.0.0.1:0"
shutdown_timeout = "20s"

[[pipeline]]
name = "t"
scan_interval = "300ms"
max_delete = "100%"

[pipeline.source.http]
base_url = "{dev}"
bearer = {{ file = "token.txt" }}
retry_budget = "20s"
{kinds_src}

[pipeline.target.http]
base_url = "{prod}"
bearer = {{ file = "token.txt" }}
prune = true
retry_budget = "20s"
{target_extra}
{kinds_dst}
"#
    ));
}

/// A test env (temporary directory) without a directory pipeline.
pub fn rest_env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tidemark.toml");
    Env { dir, config }
}

/// `tidemark verify` finds no drift.
pub fn assert_verified(env: &Env) {
    let out = env.run(&["verify"]);
    assert!(
        out.status.success(),
        "verify found drift:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Asserts prod mirrors dev: same items by name, and every reference points at the prod
/// item whose name is the dev item's name. Returns the number of items checked.
pub fn assert_rest_mirror(dev: &JsonServer, prod: &JsonServer) -> usize {
    let mut checked = 0;
    let names = |s: &JsonServer, kind: &str| -> std::collections::BTreeMap<String, Value> {
        let mut m = std::collections::BTreeMap::new();
        for item in s.all(kind) {
            let name = item["name"].as_str().unwrap().to_owned();
            assert!(
                m.insert(name.clone(), item).is_none(),
                "duplicate {kind} named {name}"
            );
        }
        m
    };
    let id_to_name = |m: &std::collections::BTreeMap<String, Value>| -> std::collections::HashMap<String, String> {
        m.iter().map(|(n, v)| (v["id"].to_string(), n.clone())).collect()
    };
    let (du, pu) = (names(dev, "users"), names(prod, "users"));
    let (dp, pp) = (names(dev, "posts"), names(prod, "posts"));
    let (dc, pc) = (names(dev, "comments"), names(prod, "comments"));
    for (d, p, kind) in [
        (&du, &pu, "users"),
        (&dp, &pp, "posts"),
        (&dc, &pc, "comments"),
    ] {
        let dn: Vec<&String> = d.keys().collect();
        let pn: Vec<&String> = p.keys().collect();
        assert_eq!(dn, pn, "{kind}: prod does not hold the same items as dev");
    }
    for (d, p, field, dref, pref) in [
        (&dp, &pp, "userId", id_to_name(&du), id_to_name(&pu)),
        (&dc, &pc, "postId", id_to_name(&dp), id_to_name(&pp)),
    ] {
        for (name, ditem) in d.iter() {
            let pitem = &p[name];
            let want = dref.get(&ditem[field].to_string());
            let got = pref.get(&pitem[field].to_string());
            assert_eq!(
                got, want,
                "{name}.{field} points at the wrong prod item ({pitem})"
            );
            checked += 1;
        }
    }
    for (d, p) in [(&du, &pu), (&dp, &pp), (&dc, &pc)] {
        for (name, ditem) in d.iter() {
            let mut a = ditem.clone();
            let mut b = p[name].clone();
            for f in ["id", "userId", "postId"] {
                a.as_object_mut().unwrap().remove(f);
                b.as_object_mut().unwrap().remove(f);
            }
            assert_eq!(a, b, "{name} differs between dev and prod");
            checked += 1;
        }
    }
    checked
}

/// Faults the proxy injects, switched on and off by the test.
#[derive(Default)]
pub struct Faults {
    /// Cycle through 429 (Retry-After: 1), 503, a slow answer, a connection dropped before
    /// the request reaches the server, and — after the server has done the work — a
    /// truncated body and a half-closed connection with no answer at all.
    pub chaos: AtomicBool,
    /// Answer 200 with malformed JSON to requests whose path contains this.
    pub corrupt: Mutex<Option<String>>,
    /// Answer 400 echoing the request's Authorization header to paths containing this.
    pub echo_auth: Mutex<Option<String>>,
    /// Where in that answer's body the echoed header starts (in characters), when more
    /// than right after its error: it is padded to put it there.
    pub echo_auth_at: AtomicU64,
    /// Answer 400 to paths containing this, quoting only the credential of the request's
    /// Authorization header (what follows its scheme) and, when that is base64 as `Basic`
    /// sends it, the `user:password` it encodes and the password alone.
    pub echo_credential: Mutex<Option<String>>,
    /// Answer 401 to requests whose query lacks this `name=value`; strip it from the
    /// others before they go on (json-server would read it as a filter).
    pub require_query: Mutex<Option<String>>,
    /// Requests answered 401 for lacking [`Faults::require_query`].
    pub refused: AtomicU64,
    /// Answer 401 to paths containing this, quoting the Authorization header and the query
    /// as a PHP API does: `/` escaped as `\/` (`json_encode`), percent-escapes in lower case.
    pub refuse_token: Mutex<Option<String>>,
    /// Answer 400 quoting the request's path and query to paths containing this.
    pub echo_path: Mutex<Option<String>>,
    /// Answer 400 with an HTML error page quoting the request's Authorization header
    /// HTML-escaped, as frameworks' error pages do, to writes (POST, PUT, PATCH) whose path
    /// contains this: once as Python's `html.escape` writes it (`&amp;`, `&lt;`, `&gt;`,
    /// `&quot;`, `&#x27;`), once as Go's `html.EscapeString` does (`&#34;`, `&#39;`).
    pub echo_auth_html: Mutex<Option<String>>,
    /// Answer 422 quoting the request's body to writes (POST, PUT, PATCH) whose path
    /// contains this, as a server whose validation error shows what it was sent.
    pub echo_body: Mutex<Option<String>>,
    /// Answer 500 to writes (POST, PUT, PATCH) whose body contains this, as a server
    /// with a bug that only one item triggers.
    pub fail_body: Mutex<Option<String>>,
    /// Answer 422 to writes (POST, PUT, PATCH) whose body contains this, as a server whose
    /// validation refuses one item until someone changes it.
    pub reject_body: Mutex<Option<String>>,
    /// Answer GETs whose query has this parameter as if it had none of it, with the
    /// server's first page of 3 items, as an API that does not know the parameter does.
    pub ignore_query: Mutex<Option<String>>,
    /// Answer 429 with `Retry-After: N` (seconds) to requests whose path contains this.
    pub throttle: Mutex<Option<(String, u64)>>,
    /// Answer every request this much later, as a slow server does.
    pub delay: Mutex<Option<Duration>>,
    /// To requests whose path contains `.0`, answer (from the server) with
    /// `Link: <.1>; rel="next"` instead of the server's own `Link`.
    pub link_next: Mutex<Option<(String, String)>>,
    /// Answer with a redirect instead of the server, as a load balancer does.
    pub redirect: Mutex<Option<Redirect>>,
    /// Cap the page size a GET asks for (`_limit`) at this, as APIs with a maximum page
    /// size do: the server answers with fewer items than asked, and its full total.
    pub cap_limit: Mutex<Option<usize>>,
    /// Once, after the server has answered a GET whose path contains `.0`, and before
    /// that answer goes back: delete `.1` on the server (a path such as `/users/7`). An
    /// item deleted between two page requests, so the items after it shift one place.
    pub delete_after: Mutex<Option<(String, String)>>,
    /// Answer this status instead of the server to GETs of this path (without a query).
    pub status_for: Mutex<Option<(String, u16)>>,
    /// After the server has handled a POST to this path (without the query), send no
    /// answer while this is set (then drop the connection): the item is on the server,
    /// and the client, killed meanwhile, never learns its id.
    pub hold_post: Mutex<Option<String>>,
    /// Hold matching requests back before they reach the server, as a server slow on some
    /// requests only does: to order two of the daemon's requests in flight at once.
    pub slow: Mutex<Vec<Slow>>,
}

/// Requests [`Faults::slow`] holds back.
pub struct Slow {
    /// Only requests with this method.
    pub method: &'static str,
    /// Only requests to a path (with its query, as asked) that starts with this.
    pub path: String,
    /// How many of them go through at once first.
    pub free: usize,
    /// How long each one after those is held.
    pub delay: Duration,
}

/// A redirect the proxy answers with.
#[derive(Clone)]
pub struct Redirect {
    /// Only requests with this method; any when `None`.
    pub method: Option<&'static str>,
    /// Only requests to this path (without the query).
    pub path: String,
    /// `301`, `302`, `307`, …
    pub status: u16,
    /// The `Location`, with `{path}` replaced by the request's path and query as asked.
    pub location: String,
}

/// An HTTP/1.1 proxy in front of a real server that injects faults and counts requests.
pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<Faults>,
    /// (method, path) of every request received.
    pub seen: Arc<Mutex<Vec<(String, String)>>>,
    pub injected: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let injected = Arc::new(AtomicU64::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let own = format!("http://127.0.0.1:{port}");
        let (f, s, i) = (faults.clone(), seen.clone(), injected.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (f, s, i, c, u, o) = (
                    f.clone(),
                    s.clone(),
                    i.clone(),
                    counter.clone(),
                    upstream.clone(),
                    own.clone(),
                );
                std::thread::spawn(move || serve(conn, &u, &o, &f, &s, &i, &c));
            }
        });
        FaultProxy {
            port,
            faults,
            seen,
            injected,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests received with this method so far.
    pub fn count(&self, method: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == method)
            .count()
    }

    pub fn writes(&self) -> usize {
        self.count("POST") + self.count("PUT") + self.count("PATCH") + self.count("DELETE")
    }
}

/// What [`Faults::echo_credential`] quotes of the Authorization header `auth`, as the rest
/// of a JSON object's fields after the one it starts.
fn credential_quoted(auth: &str) -> String {
    use base64::Engine as _;
    let credential = auth.split_once(' ').map_or(auth, |(_, c)| c);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credential)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    let password = decoded.split_once(':').map_or("", |(_, p)| p);
    format!("{credential}\",\"decoded\":\"{decoded}\",\"password\":\"{password}")
}

/// Serves one connection: `upstream` is the server's URL, `own` the proxy's (put in place
/// of the server's in its `Link` headers, as a reverse proxy in front of an API does).
fn serve(
    conn: TcpStream,
    upstream: &str,
    own: &str,
    f: &Faults,
    seen: &Mutex<Vec<(String, String)>>,
    injected: &AtomicU64,
    counter: &AtomicU64,
) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(mut path)) = (
            parts.next().map(str::to_owned),
            parts.next().map(str::to_owned),
        ) else {
            return;
        };
        let mut len = 0usize;
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "authorization" => auth = v.trim().to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push((method.clone(), path.clone()));
        let reply =
            |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
                let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                out.write_all(head.as_bytes())
                    .and_then(|_| out.write_all(body))
                    .is_ok()
            };
        // As the client asked for it, before a required key is stripped.
        let asked = path.clone();
        if let Some(needle) = f.require_query.lock().unwrap().clone() {
            let (route, query) = path.split_once('?').unwrap_or((&path, ""));
            if !query.split('&').any(|p| p == needle) {
                f.refused.fetch_add(1, Ordering::SeqCst);
                if !reply(&mut out, "401 Unauthorized", &[], b"missing api key") {
                    return;
                }
                continue;
            }
            let rest: Vec<&str> = query.split('&').filter(|p| *p != needle).collect();
            path = if rest.is_empty() {
                route.to_owned()
            } else {
                format!("{route}?{}", rest.join("&"))
            };
        }
        if let Some(param) = f.ignore_query.lock().unwrap().clone() {
            let (route, query) = path.split_once('?').unwrap_or((&path, ""));
            let prefix = format!("{param}=");
            if method == "GET" && query.split('&').any(|p| p.starts_with(&prefix)) {
                injected.fetch_add(1, Ordering::SeqCst);
                let mut rest: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.starts_with(&prefix))
                    .collect();
                rest.push("_page=1&_limit=3");
                path = format!("{route}?{}", rest.join("&"));
            }
        }
        let redirect = f.redirect.lock().unwrap().clone().filter(|r| {
            r.method.is_none_or(|m| m == method) && path.split('?').next() == Some(r.path.as_str())
        });
        if let Some(r) = redirect {
            injected.fetch_add(1, Ordering::SeqCst);
            let location = r.location.replace("{path}", &asked);
            if !reply(
                &mut out,
                &format!("{} Redirect", r.status),
                &[("location".into(), location)],
                b"",
            ) {
                return;
            }
            continue;
        }
        let refuse = f
            .refuse_token
            .lock()
            .unwrap()
            .clone()
            .filter(|p| asked.contains(p.as_str()));
        if refuse.is_some() {
            injected.fetch_add(1, Ordering::SeqCst);
            let php = |s: &str| serde_json::to_string(s).unwrap().replace('/', "\\/");
            let query = asked.split_once('?').map_or("", |(_, q)| q);
            let mut lower = String::new();
            let mut rest = query;
            while let Some(at) = rest.find('%') {
                let (before, escape) = rest.split_at(at);
                lower.push_str(before);
                let n = escape.len().min(3);
                lower.push_str(&escape[..n].to_ascii_lowercase());
                rest = &escape[n..];
            }
            lower.push_str(rest);
            let body = format!(
                "{{\"error\":\"invalid token\",\"got\":{},\"query\":{}}}",
                php(&auth),
                php(&lower)
            );
            if !reply(
                &mut out,
                "401 Unauthorized",
                &[("content-type".into(), "application/json".into())],
                body.as_bytes(),
            ) {
                return;
            }
            continue;
        }
        // A 400 that quotes what the request carried.
        let pad = (f.echo_auth_at.load(Ordering::SeqCst) as usize).saturating_sub(49);
        let auth = if pad > 0 {
            // `{"error":"bad request","pad":"` is 30 characters, `","authorization":"` 19.
            format!("{}\",\"authorization\":\"{auth}", "x".repeat(pad))
        } else {
            auth
        };
        let echo = [
            (
                &f.echo_auth,
                if pad > 0 { "pad" } else { "authorization" },
                &auth,
            ),
            (&f.echo_path, "url", &asked),
            (&f.echo_credential, "credential", &credential_quoted(&auth)),
        ]
        .into_iter()
        .find_map(|(on, field, value)| {
            let p = on.lock().unwrap().clone()?;
            path.contains(&p)
                .then(|| format!("{{\"error\":\"bad request\",\"{field}\":\"{value}\"}}"))
        });
        let echo_html = f.echo_auth_html.lock().unwrap().clone().and_then(|p| {
            (["POST", "PUT", "PATCH"].contains(&method.as_str()) && path.contains(&p)).then(|| {
                let escape = |quot: &str, apos: &str| {
                    auth.replace('&', "&amp;")
                        .replace('<', "&lt;")
                        .replace('>', "&gt;")
                        .replace('"', quot)
                        .replace('\'', apos)
                };
                format!(
                    "<html><body><h1>400 Bad Request</h1><p>Unexpected header: {}</p><!-- {} --></body></html>",
                    escape("&quot;", "&#x27;"),
                    escape("&#34;", "&#39;")
                )
            })
        });
        if let Some(b) = echo_html {
            injected.fetch_add(1, Ordering::SeqCst);
            if !reply(
                &mut out,
                "400 Bad Request",
                &[("content-type".into(), "text/html".into())],
                b.as_bytes(),
            ) {
                return;
            }
            continue;
        }
        let echo_body = f.echo_body.lock().unwrap().clone().and_then(|p| {
            (["POST", "PUT", "PATCH"].contains(&method.as_str()) && path.contains(&p)).then(|| {
                let sent = serde_json::to_string(&String::from_utf8_lossy(&body)).unwrap();
                format!("{{\"error\":\"unprocessable\",\"sent\":{sent}}}")
            })
        });
        if let Some(b) = echo_body {
            injected.fetch_add(1, Ordering::SeqCst);
            if !reply(
                &mut out,
                "422 Unprocessable Entity",
                &[("content-type".into(), "application/json".into())],
                b.as_bytes(),
            ) {
                return;
            }
            continue;
        }
        if let Some(b) = echo {
            injected.fetch_add(1, Ordering::SeqCst);
            if !reply(
                &mut out,
                "400 Bad Request",
                &[("content-type".into(), "application/json".into())],
                b.as_bytes(),
            ) {
                return;
            }
            continue;
        }
        if let Some(needle) = f.fail_body.lock().unwrap().clone() {
            if ["POST", "PUT", "PATCH"].contains(&method.as_str())
                && String::from_utf8_lossy(&body).contains(&needle)
            {
                injected.fetch_add(1, Ordering::SeqCst);
                if !reply(
                    &mut out,
                    "500 Internal Server Error",
                    &[],
                    b"{\"error\":\"boom\"}",
                ) {
                    return;
                }
                continue;
            }
        }
        if let Some(needle) = f.reject_body.lock().unwrap().clone() {
            if ["POST", "PUT", "PATCH"].contains(&method.as_str())
                && String::from_utf8_lossy(&body).contains(&needle)
            {
                injected.fetch_add(1, Ordering::SeqCst);
                if !reply(
                    &mut out,
                    "422 Unprocessable Entity",
                    &[("content-type".into(), "application/json".into())],
                    b"{\"error\":\"name is not allowed\"}",
                ) {
                    return;
                }
                continue;
            }
        }
        if let Some((p, secs)) = f.throttle.lock().unwrap().clone() {
            if path.contains(&p) {
                injected.fetch_add(1, Ordering::SeqCst);
                if !reply(
                    &mut out,
                    "429 Too Many Requests",
                    &[("retry-after".into(), secs.to_string())],
                    b"slow down",
                ) {
                    return;
                }
                continue;
            }
        }
        if let Some(p) = f.corrupt.lock().unwrap().clone() {
            if path.contains(&p) {
                injected.fetch_add(1, Ordering::SeqCst);
                let b = b"[{\"id\": 1, \"name\": \"broken";
                if !reply(
                    &mut out,
                    "200 OK",
                    &[("content-type".into(), "application/json".into())],
                    b,
                ) {
                    return;
                }
                continue;
            }
        }
        if let Some(delay) = *f.delay.lock().unwrap() {
            std::thread::sleep(delay);
        }
        let slow = f
            .slow
            .lock()
            .unwrap()
            .iter_mut()
            .find(|s| s.method == method && path.starts_with(&s.path))
            .and_then(|s| match s.free.checked_sub(1) {
                Some(free) => {
                    s.free = free;
                    None
                }
                None => Some(s.delay),
            });
        if let Some(delay) = slow {
            injected.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
        }
        // A fault that strikes after the server has handled the request.
        let mut after = None;
        if f.chaos.load(Ordering::SeqCst) {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            match n % 11 {
                1 => {
                    injected.fetch_add(1, Ordering::SeqCst);
                    if !reply(
                        &mut out,
                        "429 Too Many Requests",
                        &[("retry-after".into(), "1".into())],
                        b"slow down",
                    ) {
                        return;
                    }
                    continue;
                }
                3 => {
                    injected.fetch_add(1, Ordering::SeqCst);
                    if !reply(&mut out, "503 Service Unavailable", &[], b"maintenance") {
                        return;
                    }
                    continue;
                }
                5 => {
                    injected.fetch_add(1, Ordering::SeqCst);
                    return; // drop the connection without an answer
                }
                7 => {
                    injected.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(400));
                }
                8 => after = Some("truncate"),
                10 => after = Some("half-close"),
                _ => {}
            }
        }
        let status_for = f
            .status_for
            .lock()
            .unwrap()
            .clone()
            .filter(|(p, _)| method == "GET" && path.split('?').next() == Some(p.as_str()));
        if let Some((_, status)) = status_for {
            injected.fetch_add(1, Ordering::SeqCst);
            if !reply(
                &mut out,
                &format!("{status} Injected"),
                &[],
                b"{\"error\":\"injected\"}",
            ) {
                return;
            }
            continue;
        }
        if let Some(cap) = *f.cap_limit.lock().unwrap() {
            if method == "GET" {
                path = cap_limit(&path, cap);
            }
        }
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = client.request(m, format!("{upstream}{path}"));
        if len > 0 {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = match req.send() {
            Ok(r) => r,
            Err(_) => return,
        };
        let status = resp.status();
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(v) = resp.headers().get("x-total-count") {
            headers.push(("x-total-count".into(), v.to_str().unwrap_or("").to_owned()));
        }
        let link_next = f
            .link_next
            .lock()
            .unwrap()
            .clone()
            .filter(|(p, _)| path.contains(p.as_str()));
        if let Some((_, to)) = link_next {
            injected.fetch_add(1, Ordering::SeqCst);
            headers.push(("link".into(), format!("<{to}>; rel=\"next\"")));
        } else if let Some(v) = resp.headers().get("link") {
            let v = v.to_str().unwrap_or("").replace(upstream, own);
            headers.push(("link".into(), v));
        }
        let b = resp.bytes().unwrap_or_default();
        let held = |f: &Faults| {
            f.hold_post
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(|p| method == "POST" && path.split('?').next() == Some(p))
        };
        if held(f) {
            injected.fetch_add(1, Ordering::SeqCst);
            while held(f) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        let delete = {
            let mut d = f.delete_after.lock().unwrap();
            if d.as_ref()
                .is_some_and(|(p, _)| method == "GET" && path.contains(p.as_str()))
            {
                d.take()
            } else {
                None
            }
        };
        if let Some((_, gone)) = delete {
            injected.fetch_add(1, Ordering::SeqCst);
            let r = client.delete(format!("{upstream}{gone}")).send().unwrap();
            assert!(r.status().is_success(), "DELETE {gone}: {}", r.status());
        }
        match after {
            Some("truncate") => {
                // The full length announced, half the body sent, then the connection closed.
                injected.fetch_add(1, Ordering::SeqCst);
                let head = format!(
                    "HTTP/1.1 {} OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    status.as_u16(),
                    b.len().max(2)
                );
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(&b[..b.len() / 2]);
                return;
            }
            Some(_) => {
                // Half-closed: the server did the work, the client never hears of it.
                injected.fetch_add(1, Ordering::SeqCst);
                let _ = out.shutdown(std::net::Shutdown::Write);
                return;
            }
            None => {}
        }
        let st = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("OK")
        );
        if !reply(&mut out, &st, &headers, &b) {
            return;
        }
    }
}

/// `path` with its `_limit` parameter lowered to `cap` where it asks for more.
fn cap_limit(path: &str, cap: usize) -> String {
    let Some((route, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(
            |p| match p.strip_prefix("_limit=").map(str::parse::<usize>) {
                Some(Ok(n)) if n > cap => format!("_limit={cap}"),
                _ => p.to_owned(),
            },
        )
        .collect();
    format!("{route}?{}", query.join("&"))
}

/// An HTTP server that records the head (request line and headers) of every request it
/// gets and answers `200 []`: another origin, where a leaked credential would arrive.
pub struct Recorder {
    pub port: u16,
    /// The head of every request received, as sent.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    pub fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    loop {
                        let mut head = String::new();
                        let mut len = 0usize;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line.trim_end().is_empty() {
                                break;
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.trim().eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                            head.push_str(&line);
                        }
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        s.lock().unwrap().push(head);
                        let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]";
                        if out.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Recorder { port, seen }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The heads of the requests received so far.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// An HTTPS server with a self-signed certificate (made by `openssl` for 127.0.0.1), which a
/// client refuses as signed by no CA it trusts. It counts the connections it gets, and
/// answers `200 []` to what reaches it over a completed handshake.
pub struct TlsPeer {
    pub port: u16,
    /// Connections accepted, each one a handshake attempted.
    pub connections: Arc<AtomicU64>,
}

impl TlsPeer {
    /// Starts it, its certificate and key written to `dir`.
    pub fn start(dir: &Path) -> TlsPeer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=tidemark-test", "-addext"])
            .args(["subjectAltName=IP:127.0.0.1,DNS:localhost", "-addext"])
            .args(["basicConstraints=critical,CA:FALSE", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl makes the test certificate");
        assert!(made.status.success(), "{made:?}");
        let certs = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                let config = config.clone();
                std::thread::spawn(move || {
                    let tls = rustls::ServerConnection::new(config).unwrap();
                    let mut stream = rustls::StreamOwned::new(tls, conn);
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut buf) else { return };
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(4).any(|w| w == b"\r\n\r\n") {
                            got.clear();
                            let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n[]";
                            if stream.write_all(reply.as_bytes()).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        TlsPeer { port, connections }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

/// The `report.json` of pipeline `t`'s last run.
pub fn last_report(env: &Env) -> Value {
    let last = env
        .report_dirs("t")
        .pop()
        .unwrap_or_else(|| panic!("no report under {}", env.path("state/reports/t").display()));
    serde_json::from_slice(&std::fs::read(last.join("report.json")).unwrap()).unwrap()
}

/// Runs `sync` (text output) and returns its exit code and stdout.
pub fn sync_text(env: &Env) -> (Option<i32>, String) {
    let out = env.run(&["sync"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
