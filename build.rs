//! Records the git commit the binary is built from, for `--version`. `WHATSAPP_RELAY_COMMIT`
//! set in the build's environment wins (a build from a source archive has no git); without
//! either the commit is "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=WHATSAPP_RELAY_COMMIT");
    let commit = std::env::var("WHATSAPP_RELAY_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it points at (a commit).
        for path in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        if let Some(p) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])) {
            println!("cargo:rerun-if-changed={p}");
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!("cargo:rustc-env=WHATSAPP_RELAY_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}
