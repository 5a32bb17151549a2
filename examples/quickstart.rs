//! `cargo run --example quickstart`: start the fake KPS on loopback, reconcile
//! `examples/manifest.yaml` into `target/quickstart/`, and show what happened.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kps_sync::cli::commands;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    kps_sync::cli::logging::init(false, None, "warn");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/quickstart");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // The fake KPS, holding the three key pairs the example manifest asks for.
    let fake = fake_kps::FakeKps::start();
    for name in ["web-prod", "deploy-bot", "db-backup"] {
        fake.add_key(name);
    }
    println!("fake KPS listening on {}\n", fake.url());

    // The example manifest, pointed at the fake, with a token file beside it.
    let text = std::fs::read_to_string(root.join("examples/manifest.yaml")).unwrap();
    let text = text.replace(
        "endpoint: http://127.0.0.1:8701",
        &format!("endpoint: {}", fake.url()),
    );
    let manifest = work.join("manifest.yaml");
    std::fs::write(&manifest, text).unwrap();
    let token = work.join("kps-token");
    std::fs::write(&token, fake_kps::TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

    say("kps-sync validate");
    done(commands::validate(&manifest));
    say("kps-sync plan");
    done(commands::plan(&manifest, false).await);
    say("kps-sync reconcile");
    done(commands::reconcile(&manifest, None, false).await);

    println!("$ ls -l target/quickstart/keys");
    for rel in [
        "keys/web-prod.pem",
        "keys/deploy-bot.pem",
        "keys/backup/id_backup",
    ] {
        let meta = std::fs::metadata(work.join(rel)).unwrap();
        println!(
            "  {:o}  {:>5} bytes  {rel}",
            meta.permissions().mode() & 0o777,
            meta.len()
        );
    }
    let identity = std::fs::read_to_string(root.join("examples/age-identity.example.txt")).unwrap();
    let identity: age::x25519::Identity = identity
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap()
        .parse()
        .unwrap();
    let ciphertext = std::fs::read(work.join("keys/backup/id_backup")).unwrap();
    let decryptor = age::Decryptor::new(age::armor::ArmoredReader::new(&ciphertext[..])).unwrap();
    let mut plain = String::new();
    decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .unwrap()
        .read_to_string(&mut plain)
        .unwrap();
    println!(
        "  keys/backup/id_backup is age ciphertext; decrypted with the example identity it starts {:?}",
        plain.lines().next().unwrap_or("")
    );
    assert_eq!(Some(plain), fake.private_key("db-backup"));

    std::fs::remove_file(work.join("keys/web-prod.pem")).unwrap();
    println!("\n(deleted keys/web-prod.pem by hand)");
    say("kps-sync reconcile");
    done(commands::reconcile(&manifest, None, false).await);
    say("kps-sync status");
    done(commands::status(&manifest, false).await);
    println!("KPS calls made: {:?}", fake.stats().batch_export_calls);
    println!("Everything is in target/quickstart/. Run `kps-sync --help` for the rest.");
}

fn say(command: &str) {
    println!("$ {command}");
}

fn done(code: u8) {
    println!("(exit {code})\n");
}
