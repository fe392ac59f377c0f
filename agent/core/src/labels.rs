//! Metric names and label sets that more than one part of nodemesh speaks:
//! the `nodemesh_` prefix, closed sets of label values, and the labels that
//! name a workload's pod. Each component keeps its own families; these are
//! the words they share (and that `stat`/`tap` will read back).
use prometheus_client::encoding::EncodeLabelSet;

/// The prefix of every metric name.
pub const PREFIX: &str = "nodemesh";

/// A closed set of label values, encoded as the given text:
///
/// ```
/// nodemesh_core::label_values! {
///     /// How it went.
///     pub enum Outcome {
///         Ok => "ok",
///         Failed => "failed",
///     }
/// }
/// assert_eq!(Outcome::Failed.as_str(), "failed");
/// ```
#[macro_export]
macro_rules! label_values {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        $vis enum $name { $($(#[$vmeta])* $variant,)* }

        impl $name {
            /// Every value, in declaration order.
            #[allow(dead_code)]
            pub const ALL: &'static [Self] = &[$(Self::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)* }
            }
        }

        impl $crate::__prometheus_client::encoding::EncodeLabelValue for $name {
            fn encode(
                &self,
                encoder: &mut $crate::__prometheus_client::encoding::LabelValueEncoder,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    /// Which way a connection goes, seen from the meshed pod.
    pub enum Direction {
        /// The pod is the client.
        Outbound => "outbound",
        /// The pod is the server.
        Inbound => "inbound",
    }
}

label_values! {
    /// Whether a connection was carried over mutual TLS.
    pub enum Tls {
        Yes => "true",
        No => "false",
    }
}

impl From<bool> for Tls {
    fn from(tls: bool) -> Self {
        if tls { Self::Yes } else { Self::No }
    }
}

/// Names a meshed pod, its workload and a direction: the labels of every
/// per-pod series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    /// `deployment`, `statefulset`, `daemonset`, `job`, …, or `pod`.
    pub workload_kind: String,
    pub workload_name: String,
    pub pod: String,
    pub serviceaccount: String,
    pub direction: Direction,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_encode_as_their_text() {
        assert_eq!(Direction::Inbound.to_string(), "inbound");
        assert_eq!(Tls::from(true).as_str(), "true");
        assert_eq!(Direction::ALL.len(), 2);
    }
}
