//! Configs the real binary refuses when it loads them: exit 1, one error naming the file,
//! the line and the key, and nothing written (no state directory, no target, no report).
//! Nothing here needs a peer: a refused config never reaches one.

mod common;

use common::*;

/// Writes `text` as the config of a fresh env, runs `sync` and asserts it is refused on
/// the line of `text` that `on_line` picks (its last line containing that), naming `key`,
/// before anything was written. Returns the error.
fn refused(text: &str, on_line: &str, key: &str) -> String {
    refused_with(text, on_line, key, &[])
}

/// [`refused`] with environment variables set for the run.
fn refused_with(text: &str, on_line: &str, key: &str, vars: &[(&str, &str)]) -> String {
    refused_in(&Env::dirs("", ""), text, on_line, key, vars)
}

/// [`refused_with`] in `env`, whose directory a test has prepared (a mount).
fn refused_in(env: &Env, text: &str, on_line: &str, key: &str, vars: &[(&str, &str)]) -> String {
    env.write_config(text);
    let mut cmd = env.cmd(&["sync"]);
    for (var, value) in vars {
        cmd.env(var, value);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{text}");
    let line = text
        .lines()
        .collect::<Vec<_>>()
        .iter()
        .rposition(|l| l.contains(on_line))
        .unwrap_or_else(|| panic!("no line with {on_line:?} in\n{text}"))
        + 1;
    assert!(
        stderr.contains(&format!("tidemark.toml:{line}:")),
        "not on line {line}: {stderr}\n{text}"
    );
    assert!(stderr.contains(&format!("`{key}`")), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for written in ["state", "dst", "src/state", "src/.tidemark"] {
        assert!(
            !env.path(written).exists(),
            "a refused config wrote {written}: {stderr}"
        );
    }
    stderr
}

/// A pipeline `t` from the API at `source_url` to the one at `target_url`, both with the
/// kind `users`; `source_extra` and `target_extra` go into the sides' tables.
fn api_to_api(
    source_url: &str,
    source_extra: &str,
    target_url: &str,
    target_extra: &str,
) -> String {
    format!(
        r#"state_dir = "state"
listen = "127.0.0.1:0"

[[pipeline]]
name = "t"

[pipeline.source.http]
base_url = "{source_url}"
{source_extra}

[[pipeline.source.http.kind]]
name = "users"
path = "/users"

[pipeline.target.http]
base_url = "{target_url}"
{target_extra}

[[pipeline.target.http.kind]]
name = "users"
path = "/users"
find = "/users?name={{name}}"
"#
    )
}

/// Two `[[…kind]]` named `users` were accepted (issue): refused on the second one's
/// `name`, on either side.
#[test]
fn two_rest_kinds_of_one_name_are_refused() {
    let twice = "[[pipeline.source.http.kind]]\nname = \"users\"  # again\npath = \"/people\"\n";
    let text = api_to_api("http://127.0.0.1:19951", "", "http://127.0.0.1:19952", "").replace(
        "[pipeline.target.http]",
        &format!("{twice}\n[pipeline.target.http]"),
    );
    let err = refused(&text, "# again", "pipeline.t.source.http.kind.users.name");
    assert!(err.contains("kind `users` is configured twice"), "{err}");
    let text = format!(
        "{}\n[[pipeline.target.http.kind]]\nname = \"users\"\npath = \"/people\"\n",
        api_to_api("http://127.0.0.1:19951", "", "http://127.0.0.1:19952", "")
    );
    refused(
        &text,
        "name = \"users\"",
        "pipeline.t.target.http.kind.users.name",
    );
}

/// A REST target that is the source's API was accepted, and every sync made one more copy
/// of each item (issue): refused on the target's `base_url`, however it is written.
#[test]
fn a_rest_target_that_is_its_sources_api_is_refused() {
    let text = api_to_api(
        "http://127.0.0.1:19953/api",
        "",
        "HTTP://127.0.0.1:19953/api/",
        "",
    );
    let err = refused(&text, "base_url", "pipeline.t.target.http.base_url");
    assert!(err.contains("is the source's API"), "{err}");
}

/// `http:/u:p@host`, `https:u:p@host` and `https:\\u:p@host` passed the `user:password@`
/// check, which looked for `://`, while the URL parser takes them as `u:p@host`: the
/// client sent the password as Basic auth and every log line, `status`, report and the
/// state quoted it (issue). Each is refused on its line like `https://u:p@host`, the
/// password never repeated.
#[test]
fn a_password_in_a_base_url_is_refused_however_the_url_is_written() {
    for url in [
        "http://svc:URLPW-one-1@127.0.0.1:19963/",
        "http:/svc:URLPW-one-1@127.0.0.1:19963/",
        "http:svc:URLPW-one-1@127.0.0.1:19963/",
        r"http:\\\\svc:URLPW-one-1@127.0.0.1:19963/",
        "http:///svc@127.0.0.1:19963/",
    ] {
        let text = api_to_api(url, "", "http://127.0.0.1:19964", "");
        let err = refused(&text, "19963", "pipeline.t.source.http.base_url");
        assert!(
            err.contains("carries a user name or password"),
            "{url}: {err}"
        );
        assert!(!err.contains("URLPW"), "{url}: {err}");
    }
}

/// A `base_url` that does not parse, or is not http, was quoted whole in the error, its
/// password or `?api_key=` included (issue). The error quotes it with the user name and
/// password and the query's values as `***`.
#[test]
fn a_base_url_refused_as_no_url_is_quoted_without_its_secrets() {
    for (url, shown, why) in [
        (
            "https://u:URLPW/two-9@h.example/",
            "`https://***@h.example/`",
            "is not a URL",
        ),
        // A password holding `#` or `?` showed its user name and first characters
        // (`https://svc:Pa#***`): the fragment and query were split off first.
        (
            "https://svc:URLPW#two-9@h.example/",
            "`https://***@h.example/`",
            "is not a URL",
        ),
        (
            "https://svc:URLPW?two-9@h.example/v1",
            "`https://***@h.example/v1`",
            "is not a URL",
        ),
        (
            "https://h.example:99999/v1?api_key=QVAL-two-7&x",
            "`https://h.example:99999/v1?api_key=***&***`",
            "is not a URL",
        ),
        (
            "ftp://h.example/?api_key=QVAL-two-7",
            "`ftp://h.example/?api_key=***`",
            "must be http or https",
        ),
    ] {
        let text = api_to_api(url, "", "http://127.0.0.1:19964", "");
        let err = refused(&text, "h.example", "pipeline.t.source.http.base_url");
        assert!(
            err.contains(&format!("base_url {shown} {why}")),
            "{url}: {err}"
        );
        assert!(
            !err.contains("URLPW")
                && !err.contains("two-9")
                && !err.contains("QVAL")
                && !err.contains("svc"),
            "{url}: {err}"
        );
    }
}

/// A directory pipeline `t` from `src` to `dst`, as `Env::dirs` writes it, with
/// `state_dir = "state"` replaced by `top` (keys of the top level).
fn dirs_with(top: &str) -> String {
    let env = Env::dirs("", "");
    std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("state_dir = \"state\"", top)
}

/// `state_dir = "src/.tidemark"` mirrored the sled database and the reports to the target,
/// and the daemon never went quiet; in the target, `verify` reported them as drift
/// (issue). Refused on the key's line, before anything is created there.
#[test]
fn a_state_or_reports_directory_inside_the_source_or_target_is_refused() {
    let err = refused(
        &dirs_with("state_dir = \"src/.tidemark\""),
        "state_dir",
        "state_dir",
    );
    assert!(err.contains("inside the source directory"), "{err}");
    let err = refused(
        &dirs_with("state_dir = \"state\"\nreports_dir = \"dst/reports\""),
        "reports_dir",
        "reports_dir",
    );
    assert!(err.contains("inside the target directory"), "{err}");
    // By default the state is `state` beside the config file.
    let text = dirs_with("").replace("path = \"dst\"", "path = \".\"");
    let text = text.replace("path = \"src\"", "path = \"/nonexistent-tidemark-src\"");
    let err = refused(&text, "path = \".\"", "pipeline.t.target.dir.path");
    assert!(err.contains("`state_dir` is not set"), "{err}");
}

/// The example `"security.protocol" = "SASL_SSL"` was refused only by librdkafka, and a
/// SCRAM mechanism only once a command made its Kafka client (issue): this build has no
/// TLS, so both are refused at load on their line, saying what it supports. No broker
/// is needed: a refused config reaches none.
#[test]
fn kafka_security_this_build_cannot_do_is_refused_at_load() {
    for (property, key) in [
        ("\"security.protocol\" = \"SASL_SSL\"", "security.protocol"),
        ("\"sasl.mechanism\" = \"SCRAM-SHA-512\"", "sasl.mechanism"),
    ] {
        let text = dirs_with("state_dir = \"state\"").replace(
            "[pipeline.source.dir]",
            &format!(
                "[pipeline.log.kafka]\nbrokers = \"127.0.0.1:19959\"\n[pipeline.log.kafka.properties]\n\"sasl.username\" = \"tidemark\"\n{property}\n\n[pipeline.source.dir]"
            ),
        );
        let err = refused(
            &text,
            property,
            &format!("pipeline.t.log.kafka.properties.{key}"),
        );
        assert!(
            err.contains("this build supports `security.protocol` `PLAINTEXT` or `SASL_PLAINTEXT` and `sasl.mechanism` `PLAIN`")
                && err.contains("SASL_PLAINTEXT sends the password unencrypted"),
            "{err}"
        );
    }
}

/// `timeout = "0s"` was accepted, and every request then timed out (issue); other
/// durations of 0 make no more sense. Refused on their line.
#[test]
fn durations_of_zero_are_refused() {
    let text = api_to_api(
        "http://127.0.0.1:19954",
        "timeout = \"0s\"",
        "http://127.0.0.1:19955",
        "",
    );
    let err = refused(&text, "timeout", "pipeline.t.source.http.timeout");
    assert!(err.contains("every request would time out"), "{err}");
    let text = api_to_api(
        "http://127.0.0.1:19954",
        "",
        "http://127.0.0.1:19955",
        "retry_budget = \"0s\"",
    );
    refused(&text, "retry_budget", "pipeline.t.target.http.retry_budget");
    let text = dirs_with("state_dir = \"state\"\nshutdown_timeout = \"0s\"")
        .replace("shutdown_timeout = \"20s\"\n", "");
    refused(&text, "shutdown_timeout", "shutdown_timeout");
}

/// `pagination = { style = "page", size = 0 }` was accepted, and every page asked the API
/// for no items (issue): a page `size` of 0 is refused on its line, on either side and
/// for `offset` pagination too, naming the kind's `pagination.size`.
#[test]
fn a_page_size_of_zero_is_refused() {
    let text = api_to_api("http://127.0.0.1:19961", "", "http://127.0.0.1:19962", "").replacen(
        "path = \"/users\"\n",
        "path = \"/users\"\npagination = { style = \"page\", size = 0 }\n",
        1,
    );
    let err = refused(
        &text,
        "size = 0",
        "pipeline.t.source.http.kind.users.pagination.size",
    );
    assert!(err.contains("`size` must be at least 1"), "{err}");
    let text = format!(
        "{}pagination = {{ style = \"offset\",\n  size = 0 }}\n",
        api_to_api("http://127.0.0.1:19961", "", "http://127.0.0.1:19962", "")
    );
    refused(
        &text,
        "size = 0",
        "pipeline.t.target.http.kind.users.pagination.size",
    );
}

/// `DEV_API_TOKEN=` was accepted and sent `Authorization: Bearer ` (issue): an empty (or
/// blank) variable is refused by the commands that talk to the API, on the line of its
/// key, naming the variable; those that talk to none start without it, as without an
/// unset one.
#[test]
fn an_empty_api_token_variable_is_refused_where_it_is_needed() {
    const VAR: &str = "TIDEMARK_TEST_EMPTY_DEV_TOKEN";
    let text = api_to_api(
        "http://127.0.0.1:19956",
        &format!("bearer = {{ env = \"{VAR}\" }}"),
        "http://127.0.0.1:19957",
        "",
    );
    for value in ["", "  \n"] {
        let err = refused_with(
            &text,
            "bearer",
            "pipeline.t.source.http.bearer",
            &[(VAR, value)],
        );
        assert!(
            err.contains(&format!("environment variable `{VAR}` is empty")),
            "{err}"
        );
    }
    let env = Env::dirs("", "");
    env.write_config(&text);
    let out = env.cmd(&["status"]).env(VAR, "").output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A bad glob was reported on the line of `[pipeline.source.dir]`, a misspelled key in
/// `bearer = { … }` on the line of `[pipeline.source.http]` (issue): each on its own.
#[test]
fn a_bad_glob_or_a_misspelled_inline_key_is_named_on_its_own_line() {
    let text = dirs_with("state_dir = \"state\"").replace(
        "path = \"src\"",
        "path = \"src\"\nfollow_symlinks = false\nexclude = [\n  \"*.swp\",\n  \"cache/[0-9\",\n]",
    );
    let err = refused(&text, "cache/[0-9", "pipeline.t.source.dir.exclude");
    assert!(err.contains("bad glob `cache/[0-9`"), "{err}");
    let text = api_to_api(
        "http://127.0.0.1:19958",
        "timeout = \"5s\"\nbearer = { evn = \"DEV_API_TOKEN\" }",
        "http://127.0.0.1:19959",
        "",
    );
    let err = refused(&text, "evn", "pipeline.t.source.http.bearer");
    assert!(err.contains("unknown field `evn`"), "{err}");
}

/// Two `[pipeline.target.*]` got serde's "wanted exactly 1 element, more than 1 element"
/// (issue): the error says a pipeline has one, on the second one's line.
#[test]
fn a_pipeline_with_two_targets_is_told_it_has_one() {
    let text = format!(
        "{}\n[pipeline.target.http]\nbase_url = \"http://127.0.0.1:19960\"\n",
        dirs_with("state_dir = \"state\"")
    );
    let err = refused(&text, "[pipeline.target.http]", "pipeline.t.target.http");
    assert!(
        err.contains("a pipeline has exactly one target; found `dir` and `http`: keep one"),
        "{err}"
    );
}

/// Run where no `config/tidemark.toml` is, the error says where it looked and how to name
/// the config (it said only "No such file or directory").
#[test]
fn a_missing_config_says_where_it_looked_and_how_to_name_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .arg("status")
        .current_dir(dir.path())
        .env_remove("TIDEMARK_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read config config/tidemark.toml")
            && stderr.contains(&format!("working directory {}", dir.path().display()))
            && stderr.contains("--config FILE or TIDEMARK_CONFIG"),
        "{stderr}"
    );
}

/// A bind mount of one directory at another path, unmounted on drop (declare it after the
/// `Env` holding both, so that it goes first).
struct Bind(std::path::PathBuf);

impl Bind {
    fn mount(from: &std::path::Path, at: &std::path::Path) -> Bind {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test makes a bind mount and needs root with CAP_SYS_ADMIN (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Bind(at.to_owned())
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The names in `dir`, sorted.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A target reached through a bind mount of its source (`view` showing `src`, target
/// `view/backup`) passed the overlap check, which compared paths: `sync` wrote the mirror
/// into the source, and every sync added a level, `src/backup/backup/…` (issue). Refused
/// on the target's `path` by the directories' device and inode, before anything is
/// written, and the error says the two paths are one directory.
#[test]
fn a_target_inside_its_source_through_a_bind_mount_is_refused() {
    let env = Env::dirs("", "");
    std::fs::write(env.src().join("a"), "a").unwrap();
    let _view = Bind::mount(&env.src(), &env.path("view"));
    let text =
        dirs_with("state_dir = \"state\"").replace("path = \"dst\"", "path = \"view/backup\"");
    let err = refused_in(
        &env,
        &text,
        "view/backup",
        "pipeline.t.target.dir.path",
        &[],
    );
    assert!(err.contains("overlap"), "{err}");
    assert!(
        err.contains(&format!(
            "{} and {} are one directory, shown at two paths by a mount",
            env.path("view").canonicalize().unwrap().display(),
            env.src().canonicalize().unwrap().display()
        )),
        "{err}"
    );
    assert_eq!(names(&env.src()), ["a"], "the source was written to");
}

/// Two pipelines whose targets were `d1` and `bindd1`, a bind mount of `d1`, were both
/// accepted and both wrote (and would prune) `d1` (issue): refused on the second one's
/// target `path`, naming the first pipeline and the mount.
#[test]
fn two_pipelines_targets_overlapping_through_a_bind_mount_are_refused() {
    let env = Env::dirs("", "");
    for dir in ["sa", "sb", "d1"] {
        std::fs::create_dir_all(env.path(dir)).unwrap();
    }
    std::fs::write(env.path("sb/b"), "b").unwrap();
    let _bind = Bind::mount(&env.path("d1"), &env.path("bindd1"));
    // The mount itself, and a target inside it that does not exist yet.
    for target in ["bindd1", "bindd1/sub"] {
        let text = format!(
            r#"state_dir = "state"

[[pipeline]]
name = "a"
[pipeline.source.dir]
path = "sa"
[pipeline.target.dir]
path = "d1"

[[pipeline]]
name = "b"
[pipeline.source.dir]
path = "sb"
[pipeline.target.dir]
prune = true
path = "{target}"
"#
        );
        let err = refused_in(&env, &text, target, "pipeline.b.target.dir.path", &[]);
        assert!(err.contains("overlaps the target of pipeline `a`"), "{err}");
        assert!(err.contains("shown at two paths by a mount"), "{err}");
    }
    assert!(names(&env.path("d1")).is_empty(), "d1 was written to");
}

/// A `state_dir` reached through a bind mount of the source passed the check that keeps
/// the state out of the source, which compared paths (issue): every scan would have
/// mirrored the sled database. Refused on its line, nothing created in the source.
#[test]
fn a_state_directory_inside_the_source_through_a_bind_mount_is_refused() {
    let env = Env::dirs("", "");
    let _view = Bind::mount(&env.src(), &env.path("view"));
    let text = dirs_with("state_dir = \"view/.tidemark\"");
    let err = refused_in(&env, &text, "state_dir", "state_dir", &[]);
    assert!(err.contains("inside the source directory"), "{err}");
    assert!(err.contains("shown at two paths by a mount"), "{err}");
    assert!(names(&env.src()).is_empty(), "the source was written to");
}

/// A path written as in a shell: a leading `~` is the home directory (it made a directory
/// named `~` beside the config, and `$HOME/mirror` stayed empty), and forms a shell would
/// expand that tidemark does not (`$HOME`, `~user`) are refused on their line rather than
/// taken as literal names.
#[test]
fn a_home_directory_path_is_expanded_and_shell_variables_are_refused() {
    let env = Env::dirs("", "");
    let home = env.path("home");
    std::fs::create_dir_all(env.src()).unwrap();
    std::fs::write(env.src().join("a.txt"), "a").unwrap();
    let config = |state: &str, target: &str| {
        format!(
            "state_dir = \"{state}\"\nlisten = \"127.0.0.1:0\"\n\n[[pipeline]]\nname = \"t\"\n\n[pipeline.source.dir]\npath = \"src\"\n\n[pipeline.target.dir]\npath = \"{target}\"\n"
        )
    };
    env.write_config(&config("~/state", "~/mirror"));
    let out = env.cmd(&["sync"]).env("HOME", &home).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(home.join("mirror/a.txt")).unwrap(), b"a");
    assert!(home.join("state").is_dir());
    assert!(!env.path("~").exists(), "a directory named ~ was made");

    for (state, target, on_line, key, says) in [
        (
            "state",
            "$HOME/mirror",
            "path = \"$HOME",
            "pipeline.t.target.dir.path",
            "environment variables are not expanded",
        ),
        (
            "${XDG_STATE_HOME}/tm",
            "dst",
            "state_dir",
            "state_dir",
            "environment variables are not expanded",
        ),
        (
            "state",
            "~bob/mirror",
            "path = \"~bob",
            "pipeline.t.target.dir.path",
            "`~user` is not expanded",
        ),
    ] {
        let stderr = refused_with(&config(state, target), on_line, key, &[]);
        assert!(stderr.contains(says), "{stderr}");
    }
}
