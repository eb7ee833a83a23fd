//! The Vault test server as a process of its own, for benchmarks and demos:
//! `cargo run --example vault_test_server -- [--port 8200]`
//! It serves the API subset described in `tests/it/support/vault.rs` on
//! 127.0.0.1 until killed, with a KV v2 mount `secret/`, a KV v1 mount `kv/`,
//! a database engine (role `app`: 1h TTL, 24h max) and PKI (role `web`), and
//! prints its address and root token.

// Harness code: a panic is a failed run with its line.
#![allow(clippy::unwrap_used)]

#[path = "../tests/it/support/vault.rs"]
#[allow(dead_code)]
mod vault;

fn main() {
    let mut port = 8200u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--port" {
            port = args
                .next()
                .and_then(|p| p.parse().ok())
                .expect("--port takes a number");
        } else {
            panic!("unknown argument {arg}; usage: vault_test_server [--port 8200]");
        }
    }
    let server = vault::VaultServer::start_on(&format!("127.0.0.1:{port}"));
    server.database_role("app", 3600, 86_400);
    server.pki_role("web", 86_400, false);
    println!("VAULT_ADDR={}", server.url);
    println!("VAULT_TOKEN={}", server.root_token);
    loop {
        std::thread::park();
    }
}
