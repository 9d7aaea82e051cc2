//! TEMPORARY STUB: replaced by the real verifiers module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    Twilio,
    Meta,
    Dialog360,
    Sinch,
    Kaleyra,
    Generic,
}
impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Twilio => "twilio",
            Self::Meta => "meta",
            Self::Dialog360 => "360dialog",
            Self::Sinch => "sinch",
            Self::Kaleyra => "kaleyra",
            Self::Generic => "generic",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "twilio" => Self::Twilio,
            "meta" => Self::Meta,
            "360dialog" => Self::Dialog360,
            "sinch" => Self::Sinch,
            "kaleyra" => Self::Kaleyra,
            "generic" => Self::Generic,
            _ => return None,
        })
    }
}
pub struct Inbound<'a> {
    pub method: &'a http::Method,
    pub url: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
    pub client_ip: std::net::IpAddr,
    pub now_unix: i64,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}
#[derive(Clone, Debug, Default)]
pub struct VerifierConfig {
    pub provider: Option<ProviderKind>,
    pub auth_token: Option<String>,
    pub app_secret: Option<String>,
    pub verify_token: Option<String>,
    pub webhook_secret: Option<String>,
    pub platform_secret: Option<String>,
    pub shared_token: Option<String>,
    pub token_header: Option<String>,
    pub token_param: Option<String>,
    pub allow_from: Vec<ipnet::IpNet>,
    pub hmac_header: Option<String>,
    pub hmac_secret: Option<String>,
    pub hmac_algorithm: Option<String>,
    pub hmac_encoding: Option<String>,
    pub hmac_prefix: Option<String>,
    pub insecure_no_verification: bool,
}
pub struct AccountVerifier {
    insecure: bool,
}
impl AccountVerifier {
    pub fn new(cfg: &VerifierConfig) -> Result<AccountVerifier, String> {
        Ok(AccountVerifier { insecure: cfg.insecure_no_verification })
    }
    pub fn verify(&self, _req: &Inbound<'_>) -> Result<(), Rejection> {
        Ok(())
    }
    pub fn is_insecure(&self) -> bool {
        self.insecure
    }
}
pub fn meta_handshake(_query: Option<&str>, _verify_token: Option<&str>) -> Option<Result<String, Rejection>> {
    None
}
pub fn ack(kind: ProviderKind) -> (&'static str, &'static str) {
    if kind == ProviderKind::Twilio {
        ("text/xml", "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>")
    } else {
        ("text/plain", "")
    }
}
pub fn conversation(_kind: ProviderKind, _ct: Option<&str>, _body: &[u8]) -> Option<String> {
    None
}
pub fn event_id(_kind: ProviderKind, _ct: Option<&str>, _body: &[u8]) -> Option<String> {
    None
}
