//! `voipc bench chat`: Signal-protocol message rates, against plain AES-256-GCM on the
//! same message size in the same run.

use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rand::SeedableRng;
use rand::rngs::StdRng;
use uuid::Uuid;

use crate::e2ee::E2ee;
use crate::protocol::bundle::PeerBundle;
use crate::relay::keys::StoredBundle;

/// Bytes of a typical chat message.
const MESSAGE: &[u8; 200] = &[b'm'; 200];
/// Members of the channel case.
const CHANNEL_MEMBERS: usize = 20;

/// Runs `op` repeatedly for `window`; operations per second.
fn rate(window: Duration, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < window {
        op()?;
        count += 1;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// The bundle a server would hand out first for `e2ee`.
fn bundle_of(e2ee: &E2ee) -> anyhow::Result<PeerBundle> {
    let mut stored = StoredBundle::new(e2ee.bundle_upload()?).map_err(|e| anyhow::anyhow!("bundle refused: {e:?}"))?;
    Ok(stored.hand_out(true))
}

pub fn run(window: Duration, json: bool) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let mut rng = StdRng::from_os_rng();
    let mut alice = E2ee::generate(&mut rng, now)?;
    let mut bob = E2ee::generate(&mut rng, now)?;
    alice.start_session("bob", &bundle_of(&bob)?, now, &mut rng)?;
    let first = alice.encrypt("bob", b"hello", now, &mut rng)?;
    bob.decrypt("alice", &first, &mut rng)?;

    // Direct messages: encrypt then decrypt, alternating directions like a conversation.
    let mut turn = false;
    let dm = rate(window, || {
        turn = !turn;
        let (from, to, from_name, to_name) =
            if turn { (&mut alice, &mut bob, "alice", "bob") } else { (&mut bob, &mut alice, "bob", "alice") };
        let sealed = from.encrypt(to_name, MESSAGE, now, &mut rng)?;
        to.decrypt(from_name, &sealed, &mut rng)?;
        Ok(())
    })?;

    // A channel: one sender key encryption, decrypted by every other member.
    let mut members: Vec<E2ee> =
        (1..CHANNEL_MEMBERS).map(|_| E2ee::generate(&mut rng, now)).collect::<Result<_, _>>()?;
    let distribution = Uuid::from_bytes([7; 16]);
    let skdm = alice.sender_key_distribution("alice", distribution, &mut rng)?;
    for member in &mut members {
        member.accept_sender_key("alice", &skdm)?;
    }
    let channel = rate(window, || {
        let ciphertext = alice.group_encrypt("alice", distribution, MESSAGE, &mut rng)?;
        for member in &mut members {
            member.group_decrypt("alice", &ciphertext)?;
        }
        Ok(())
    })?;

    // Baseline: AES-256-GCM seal and open of the same bytes, once per recipient.
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9; 32]).expect("32-byte key"));
    let mut counter = 0u64;
    let aes = rate(window, || {
        counter += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        let mut buffer = MESSAGE.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buffer)
            .map_err(|_| anyhow::anyhow!("seal failed"))?;
        key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buffer)
            .map_err(|_| anyhow::anyhow!("open failed"))?;
        Ok(())
    })?;

    if json {
        let report = serde_json::json!({
            "message_bytes": MESSAGE.len(),
            "dm_encrypt_decrypt_per_sec": dm,
            "channel_members": CHANNEL_MEMBERS,
            "channel_messages_per_sec": channel,
            "aes_gcm_seal_open_per_sec": aes,
            "dm_ratio_to_aes": dm / aes,
            "channel_ratio_to_aes": channel * (CHANNEL_MEMBERS - 1) as f64 / aes,
        });
        println!("{report}");
    } else {
        println!("chat bench: {}-byte messages, {:.1} s per case", MESSAGE.len(), window.as_secs_f64());
        println!("  direct message (Double Ratchet) encrypt+decrypt: {dm:>10.0}/s");
        println!(
            "  {CHANNEL_MEMBERS}-member channel (Sender Keys), 1 encrypt + {} decrypts: {channel:>10.0} messages/s",
            CHANNEL_MEMBERS - 1
        );
        println!("  baseline AES-256-GCM seal+open of the same bytes: {aes:>10.0}/s");
        println!(
            "  ratios to the baseline: DM {:.4}, channel deliveries {:.4}",
            dm / aes,
            channel * (CHANNEL_MEMBERS - 1) as f64 / aes
        );
    }
    Ok(())
}
