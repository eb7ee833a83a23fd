//! The Consul test server as a process of its own, for benchmarks and demos:
//! `cargo run --example consul_test_server -- [--port 8500] [--service NAME@ADDR:PORT]... [KEY=VALUE]...`
//! It serves the KV and service API subset described in
//! `tests/it/support/consul.rs` on 127.0.0.1 until killed.

// Harness code: a panic is a failed run with its line.
#![allow(clippy::unwrap_used)]

#[path = "../tests/it/support/consul.rs"]
#[allow(dead_code)]
mod consul;

fn main() {
    let mut port = 8500u16;
    let mut seeds = Vec::new();
    let mut services = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--port" {
            port = args
                .next()
                .and_then(|p| p.parse().ok())
                .expect("--port takes a number");
        } else if arg == "--service" {
            let spec = args.next().unwrap_or_default();
            let parsed = spec.split_once('@').and_then(|(name, addr)| {
                let (host, port) = addr.rsplit_once(':')?;
                Some((
                    name.to_string(),
                    host.to_string(),
                    port.parse::<u16>().ok()?,
                ))
            });
            services.push(parsed.expect("--service takes NAME@ADDR:PORT"));
        } else if let Some((k, v)) = arg.split_once('=') {
            seeds.push((k.to_string(), v.to_string()));
        } else {
            eprintln!(
                "usage: consul_test_server [--port N] [--service NAME@ADDR:PORT]... [KEY=VALUE]..."
            );
            std::process::exit(2);
        }
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let server = consul::ConsulServer::serve(listener);
    for (k, v) in seeds {
        server.put(&k, &v);
    }
    for (n, (name, address, port)) in services.into_iter().enumerate() {
        server.register(consul::Instance {
            node: format!("node-{n}"),
            node_address: address.clone(),
            id: format!("{name}-{n}"),
            service: name,
            address,
            port,
            tags: Vec::new(),
            meta: Default::default(),
            checks: vec!["passing".to_string()],
        });
    }
    println!("{}", server.url);
    loop {
        std::thread::park();
    }
}
