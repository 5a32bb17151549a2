//! `fake-kps [--port N] [--keys a,b,c] [--latency-ms N] [--rate-limit N] [--help]`: serves the fake
//! on 127.0.0.1 until killed, after printing `KEY=VALUE` lines a script can source.

use std::time::Duration;

fn main() {
    let (mut port, mut keys, mut latency_ms) = (0u16, Vec::new(), 0u64);
    let mut rate_limit: Option<u32> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            "--port" => {
                port = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--port: not a port"))
            }
            "--keys" => {
                keys = value()
                    .split(',')
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect()
            }
            "--latency-ms" => {
                latency_ms = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--latency-ms: not a number"))
            }
            "--rate-limit" => {
                rate_limit = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|_| usage("--rate-limit: not a number")),
                )
            }
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    let fake = fake_kps::FakeKps::start_on(port).unwrap_or_else(|e| {
        eprintln!("fake-kps: cannot bind 127.0.0.1:{port}: {e}");
        std::process::exit(1)
    });
    fake.set_latency(Duration::from_millis(latency_ms));
    // All KPS calls together, N per second; 429 with Retry-After beyond.
    fake.set_rate_limit(rate_limit);
    for k in &keys {
        fake.add_key(k);
    }
    println!("URL={}", fake.url());
    println!("TOKEN={}", fake_kps::TOKEN);
    println!("PROJECT_ID={}", fake_kps::PROJECT_ID);
    println!("AK={}", fake_kps::AK);
    println!("SK={}", fake_kps::SK);
    loop {
        std::thread::park();
    }
}

const USAGE: &str = "usage: fake-kps [--port N] [--keys a,b,c] [--latency-ms N] [--rate-limit N]

Serves a fake Huawei Cloud KPS (plus IAM and the ECS metadata service) on 127.0.0.1 until
killed, after printing URL=, TOKEN=, PROJECT_ID=, AK= and SK= lines a shell can source.

  --port N         port to bind on 127.0.0.1 (default: any free port)
  --keys a,b,c     key pairs to create, each a fresh ed25519 key
  --latency-ms N   delay before each KPS answer
  --rate-limit N   admit N KPS calls per second in all; 429 with Retry-After beyond
  -h, --help       print this help";

fn usage(why: &str) -> ! {
    eprintln!("fake-kps: {why}\n{USAGE}");
    std::process::exit(2)
}
