//! What the API server said of a token, remembered for the token's life:
//! a flood of certificate requests with one token costs one TokenReview,
//! not one each. Only accepted tokens are kept (keyed by their SHA-256,
//! never the token), until the token's `exp` (at most an hour), in a
//! bounded map; a rejected token is asked about again every time.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use sha2::{Digest, Sha256};

/// Tokens remembered at most (agents hold one each).
pub const MAX_REVIEWS: usize = 4096;
/// However long a token says it lives.
const LONGEST: Duration = Duration::from_secs(3600);

type Key = [u8; 32];

/// Accepted tokens' reviews.
#[derive(Debug, Default)]
pub struct Reviews {
    kept: Mutex<HashMap<Key, (TokenReviewStatus, Instant)>>,
}

impl Reviews {
    fn key(token: &str) -> Key {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The review of `token`, if one is remembered and the token lives.
    pub fn get(&self, token: &str) -> Option<TokenReviewStatus> {
        let key = Self::key(token);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        match kept.get(&key) {
            Some((status, until)) if *until > Instant::now() => Some(status.clone()),
            Some(_) => {
                kept.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers an accepted token's review until the token's end.
    pub fn put(&self, token: &str, status: &TokenReviewStatus) {
        let Some(left) = lifetime_left(token, SystemTime::now()) else {
            return;
        };
        let now = Instant::now();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= MAX_REVIEWS {
            kept.retain(|_, (_, until)| *until > now);
            if kept.len() >= MAX_REVIEWS {
                // Still full of live ones: the one ending first goes.
                if let Some(first) = kept.iter().min_by_key(|(_, (_, u))| *u).map(|(k, _)| *k) {
                    kept.remove(&first);
                }
            }
        }
        kept.insert(Self::key(token), (status.clone(), now + left.min(LONGEST)));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// How long `token` (a JWT the API server accepted) lives from `now`, by
/// its `exp` claim; `None` when it says nothing readable (not kept).
fn lifetime_left(token: &str, now: SystemTime) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    exp.checked_sub(now)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"RS256"}"#),
            e.encode(format!(r#"{{"exp":{exp},"sub":"x"}}"#))
        )
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn an_accepted_token_is_remembered_for_its_life_and_no_longer() {
        let reviews = Reviews::default();
        let status = TokenReviewStatus {
            authenticated: Some(true),
            ..TokenReviewStatus::default()
        };
        let live = jwt(now() + 600);
        reviews.put(&live, &status);
        assert_eq!(reviews.get(&live).unwrap().authenticated, Some(true));
        // An expired token, one without exp, garbage: never kept.
        for t in [
            jwt(now() - 1),
            "a.b.c".to_owned(),
            "garbage".to_owned(),
            String::new(),
        ] {
            reviews.put(&t, &status);
            assert!(reviews.get(&t).is_none(), "{t}");
        }
        assert_eq!(reviews.len(), 1);
        assert_eq!(
            lifetime_left(&jwt(now() + 100_000), SystemTime::now()).map(|d| d.min(LONGEST)),
            Some(LONGEST)
        );
    }

    #[test]
    fn the_map_stays_bounded() {
        let reviews = Reviews::default();
        let status = TokenReviewStatus::default();
        for i in 0..(MAX_REVIEWS + 10) as u64 {
            reviews.put(&jwt(now() + 600 + i), &status);
        }
        assert_eq!(reviews.len(), MAX_REVIEWS);
    }
}
