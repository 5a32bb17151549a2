//! `kps:`: where KPS is and the one auth method.

use super::*;

impl Checker<'_> {
    pub(super) fn kps(&mut self, kps: RawKps) -> Option<KpsConfig> {
        let region = kps.region.map(|r| r.0);
        if let Some(r) = &region
            && !valid_region(r)
        {
            self.problem(
                path(&["kps", "region"]),
                Target::Value,
                format!(
                    "`{r}` is not a region name: write one like `cn-north-4` (lowercase letters, \
                     digits and `-`)"
                ),
            );
        }
        let endpoint = match (&kps.endpoint, &region) {
            (Some(e), _) => match check_url(e.as_str(), HttpRule::LoopbackOnly) {
                Ok(url) => Some(url),
                Err(why) => {
                    self.problem(path(&["kps", "endpoint"]), Target::Value, why);
                    None
                }
            },
            (None, Some(r)) if valid_region(r) && regions::is_known(r) => {
                Some(format!("https://kms.{r}.myhuaweicloud.com"))
            }
            (None, Some(r)) if valid_region(r) => {
                // With `endpoint:` the region only names IAM's host, and private clouds have
                // regions of their own: only a region that must give the KPS host is checked.
                self.problem(
                    path(&["kps", "region"]),
                    Target::Value,
                    format!(
                        "`{r}` is not a region where KPS exists (the official SDK knows 30); did                          you mean `{}`? For a private cloud, give `endpoint:` (its KPS URL)                          instead",
                        regions::closest(r)
                    ),
                );
                None
            }
            (None, Some(_)) => None,
            (None, None) => {
                self.problem(
                    path(&["kps"]),
                    Target::Key,
                    "`kps:` needs `region:` (e.g. `region: cn-north-4`) or `endpoint:` (an \
                     https:// URL)",
                );
                None
            }
        };
        let project_id = match kps.project_id {
            None => {
                self.problem(
                    path(&["kps"]),
                    Target::Key,
                    "`kps.project_id:` is missing: add the 32 hex characters of the project's \
                     ID (console: My Credentials > API Credentials)",
                );
                None
            }
            Some(p) if p.0.len() == 32 && p.0.bytes().all(|b| b.is_ascii_hexdigit()) => Some(p.0),
            Some(p) => {
                self.problem(
                    path(&["kps", "project_id"]),
                    Target::Value,
                    format!(
                        "`project_id` must be 32 hex characters (found {} characters{}): copy \
                         the project ID from the console (My Credentials > API Credentials)",
                        p.0.chars().count(),
                        if p.0.bytes().all(|b| b.is_ascii_hexdigit()) {
                            ""
                        } else {
                            ", not all hex"
                        }
                    ),
                );
                None
            }
        };
        let ca_file = kps
            .ca_file
            .and_then(|f| self.resolve(&f, path(&["kps", "ca_file"]), "ca_file"));
        let auth = self.auth(kps.auth.unwrap_or_default(), region.as_deref());
        Some(KpsConfig {
            region,
            endpoint: endpoint?,
            project_id: project_id?,
            auth: auth?,
            ca_file,
        })
    }

    fn auth(&mut self, auth: RawAuth, region: Option<&str>) -> Option<AuthConfig> {
        let at = |k: &str| path(&["kps", "auth", k]);
        // The methods written, each named by the field that selects it. AK/SK takes up to three
        // fields: it is named by the one written first.
        let mut methods: Vec<(Option<Location>, &str)> = Vec::new();
        let mut add = |names: &[(&'static str, bool)]| {
            let first = names
                .iter()
                .filter(|(_, given)| *given)
                .map(|(name, _)| (locate(self.text, &at(name), Target::Key), *name))
                .min();
            methods.extend(first);
        };
        add(&[("token_file", auth.token_file.is_some())]);
        add(&[
            ("access_key_file", auth.access_key_file.is_some()),
            ("secret_key_file", auth.secret_key_file.is_some()),
            ("security_token_file", auth.security_token_file.is_some()),
        ]);
        add(&[("iam", auth.iam.is_given())]);
        add(&[("ecs_metadata", auth.ecs_metadata.is_given())]);
        methods.sort();
        let methods: Vec<&str> = methods.into_iter().map(|(_, name)| name).collect();
        if methods.len() > 1 {
            let names: Vec<String> = methods.iter().map(|m| format!("`{m}`")).collect();
            // Point at the method written last: most likely the one added by mistake.
            let last = methods[methods.len() - 1];
            self.problem(
                at(last),
                Target::Key,
                format!(
                    "`kps.auth` names {} methods ({}): keep exactly one",
                    methods.len(),
                    names.join(" and ")
                ),
            );
            return None;
        }
        let method = methods.first().copied();
        match method {
            None => Some(AuthConfig::Unspecified),
            Some("token_file") => {
                let file = auth.token_file?;
                self.resolve(&file, at("token_file"), "token_file")
                    .map(AuthConfig::TokenFile)
            }
            Some("iam") => {
                let Present::Given(iam) = auth.iam else {
                    return None;
                };
                let iam_at = |k: &str| path(&["kps", "auth", "iam", k]);
                let mut missing = Vec::new();
                if iam.user.is_none() {
                    missing.push("user");
                }
                if iam.domain.is_none() {
                    missing.push("domain");
                }
                if iam.password_file.is_none() {
                    missing.push("password_file");
                }
                if !missing.is_empty() {
                    let list: Vec<String> = missing.iter().map(|m| format!("`{m}:`")).collect();
                    self.problem(
                        at("iam"),
                        Target::Key,
                        format!(
                            "`iam:` needs `user:`, `domain:` and `password_file:`; missing {}",
                            list.join(", ")
                        ),
                    );
                }
                let password_file = iam
                    .password_file
                    .and_then(|f| self.resolve(&f, iam_at("password_file"), "password_file"));
                let endpoint = match iam.endpoint {
                    None => {
                        if region.is_none() {
                            self.problem(
                                at("iam"),
                                Target::Key,
                                "`iam:` without `endpoint:` needs `kps.region:` to find IAM \
                                 (https://iam.{region}.myhuaweicloud.com): add one of them",
                            );
                        }
                        None
                    }
                    Some(e) => match check_url(e.as_str(), HttpRule::LoopbackOnly) {
                        Ok(url) => Some(url),
                        Err(why) => {
                            self.problem(iam_at("endpoint"), Target::Value, why);
                            return None;
                        }
                    },
                };
                Some(AuthConfig::Iam {
                    user: non_empty(iam.user?.0)?,
                    domain: non_empty(iam.domain?.0)?,
                    password_file: password_file?,
                    endpoint,
                })
            }
            Some("ecs_metadata") => {
                let Present::Given(ecs) = auth.ecs_metadata else {
                    return None;
                };
                let endpoint = match ecs.endpoint {
                    None => None,
                    Some(e) => match check_url(e.as_str(), HttpRule::Any) {
                        Ok(url) => Some(url),
                        Err(why) => {
                            self.problem(
                                path(&["kps", "auth", "ecs_metadata", "endpoint"]),
                                Target::Value,
                                why,
                            );
                            return None;
                        }
                    },
                };
                Some(AuthConfig::EcsMetadata { endpoint })
            }
            Some(_) => {
                let (Some(ak), Some(sk)) = (&auth.access_key_file, &auth.secret_key_file) else {
                    let missing = if auth.access_key_file.is_none() {
                        "access_key_file"
                    } else {
                        "secret_key_file"
                    };
                    let present = methods[0];
                    self.problem(
                        at(present),
                        Target::Key,
                        format!(
                            "AK/SK auth needs both `access_key_file:` and `secret_key_file:` \
                             (`security_token_file:` is optional); add `{missing}:`"
                        ),
                    );
                    return None;
                };
                let access_key_file = self.resolve(ak, at("access_key_file"), "access_key_file");
                let secret_key_file = self.resolve(sk, at("secret_key_file"), "secret_key_file");
                let security_token_file = match &auth.security_token_file {
                    None => None,
                    Some(t) => {
                        Some(self.resolve(t, at("security_token_file"), "security_token_file")?)
                    }
                };
                Some(AuthConfig::AkSk {
                    access_key_file: access_key_file?,
                    secret_key_file: secret_key_file?,
                    security_token_file,
                })
            }
        }
    }
}
