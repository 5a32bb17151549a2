//! `kps:`: where KPS is and the one auth method.

use super::*;

impl Checker<'_> {
    pub(super) fn kps(&mut self, kps: RawKps) -> Option<KpsConfig> {
        let region = kps.region.map(|r| r.0);
        let region_ok = region.as_deref().is_none_or(|r| self.region(r));
        let endpoint = match (&kps.endpoint, &region) {
            (Some(e), _) => self.url(
                e.as_str(),
                HttpRule::LoopbackOnly,
                path(&["kps", "endpoint"]),
            ),
            (None, Some(r)) if region_ok => self.kps_host(r),
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
        let project_id = self.project_id(kps.project_id);
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

    /// Whether `r` is written like a region name.
    fn region(&mut self, r: &str) -> bool {
        if valid_region(r) {
            return true;
        }
        self.problem(
            path(&["kps", "region"]),
            Target::Value,
            format!(
                "`{r}` is not a region name: write one like `cn-north-4` (lowercase letters, \
                 digits and `-`)"
            ),
        );
        false
    }

    /// The KPS host of a region, when no `endpoint:` is given.
    fn kps_host(&mut self, r: &str) -> Option<String> {
        if regions::is_known(r) {
            return Some(format!("https://kms.{r}.myhuaweicloud.com"));
        }
        // With `endpoint:` the region only names IAM's host, and private clouds have regions of
        // their own: only a region that must give the KPS host is checked.
        self.problem(
            path(&["kps", "region"]),
            Target::Value,
            format!(
                "`{r}` is not a region where KPS exists (the official SDK knows 30); did you \
                 mean `{}`? For a private cloud, give `endpoint:` (its KPS URL) instead",
                regions::closest(r)
            ),
        );
        None
    }

    fn project_id(&mut self, raw: Option<Text>) -> Option<String> {
        let Some(p) = raw else {
            self.problem(
                path(&["kps"]),
                Target::Key,
                "`kps.project_id:` is missing: add the 32 hex characters of the project's ID \
                 (console: My Credentials > API Credentials)",
            );
            return None;
        };
        let hex = p.0.bytes().all(|b| b.is_ascii_hexdigit());
        if p.0.len() == 32 && hex {
            return Some(p.0);
        }
        self.problem(
            path(&["kps", "project_id"]),
            Target::Value,
            format!(
                "`project_id` must be 32 hex characters (found {} characters{}): copy the \
                 project ID from the console (My Credentials > API Credentials)",
                p.0.chars().count(),
                if hex { "" } else { ", not all hex" }
            ),
        );
        None
    }

    fn auth(&mut self, auth: RawAuth, region: Option<&str>) -> Option<AuthConfig> {
        let method = self.auth_method(&auth)?;
        match method {
            None => Some(AuthConfig::Unspecified),
            Some("token_file") => {
                let file = auth.token_file?;
                self.resolve(&file, auth_at("token_file"), "token_file")
                    .map(AuthConfig::TokenFile)
            }
            Some("iam") => match auth.iam {
                Present::Given(iam) => self.iam(iam, region),
                Present::Absent => None,
            },
            Some("ecs_metadata") => match auth.ecs_metadata {
                Present::Given(ecs) => self.ecs_metadata(ecs),
                Present::Absent => None,
            },
            Some(first) => self.ak_sk(&auth, first),
        }
    }

    /// The one method written (named by its first field), `Ok(None)` for none; more than one
    /// is a problem.
    fn auth_method(&mut self, auth: &RawAuth) -> Option<Option<&'static str>> {
        // The methods written, each named by the field that selects it. AK/SK takes up to three
        // fields: it is named by the one written first.
        let groups: [&[(&'static str, bool)]; 4] = [
            &[("token_file", auth.token_file.is_some())],
            &[
                ("access_key_file", auth.access_key_file.is_some()),
                ("secret_key_file", auth.secret_key_file.is_some()),
                ("security_token_file", auth.security_token_file.is_some()),
            ],
            &[("iam", auth.iam.is_given())],
            &[("ecs_metadata", auth.ecs_metadata.is_given())],
        ];
        let given = groups.iter().flat_map(|g| g.iter()).filter(|(_, g)| *g);
        // Order by place only when there is a choice: locating takes a parse of the text.
        let place = |name: &str| match given.clone().count() {
            0 | 1 => None,
            _ => locate(self.text, &auth_at(name), Target::Key),
        };
        let mut methods: Vec<(Option<Location>, &'static str)> = groups
            .iter()
            .filter_map(|names| {
                names
                    .iter()
                    .filter(|(_, given)| *given)
                    .map(|(name, _)| (place(name), *name))
                    .min()
            })
            .collect();
        methods.sort();
        let methods: Vec<&'static str> = methods.into_iter().map(|(_, name)| name).collect();
        if let [.., last] = methods[..]
            && methods.len() > 1
        {
            let names: Vec<String> = methods.iter().map(|m| format!("`{m}`")).collect();
            // Point at the method written last: most likely the one added by mistake.
            self.problem(
                auth_at(last),
                Target::Key,
                format!(
                    "`kps.auth` names {} methods ({}): keep exactly one",
                    methods.len(),
                    names.join(" and ")
                ),
            );
            return None;
        }
        Some(methods.first().copied())
    }

    fn iam(&mut self, iam: RawIam, region: Option<&str>) -> Option<AuthConfig> {
        let iam_at = |k: &str| path(&["kps", "auth", "iam", k]);
        let missing: Vec<String> = [
            ("user", iam.user.is_none()),
            ("domain", iam.domain.is_none()),
            ("password_file", iam.password_file.is_none()),
        ]
        .iter()
        .filter(|(_, missing)| *missing)
        .map(|(name, _)| format!("`{name}:`"))
        .collect();
        if !missing.is_empty() {
            self.problem(
                auth_at("iam"),
                Target::Key,
                format!(
                    "`iam:` needs `user:`, `domain:` and `password_file:`; missing {}",
                    missing.join(", ")
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
                        auth_at("iam"),
                        Target::Key,
                        "`iam:` without `endpoint:` needs `kps.region:` to find IAM \
                         (https://iam.{region}.myhuaweicloud.com): add one of them",
                    );
                }
                None
            }
            Some(e) => Some(self.url(e.as_str(), HttpRule::LoopbackOnly, iam_at("endpoint"))?),
        };
        Some(AuthConfig::Iam {
            user: non_empty(iam.user?.0)?,
            domain: non_empty(iam.domain?.0)?,
            password_file: password_file?,
            endpoint,
        })
    }

    fn ecs_metadata(&mut self, ecs: RawEcs) -> Option<AuthConfig> {
        let endpoint = match ecs.endpoint {
            None => None,
            Some(e) => Some(self.url(
                e.as_str(),
                HttpRule::Any,
                path(&["kps", "auth", "ecs_metadata", "endpoint"]),
            )?),
        };
        Some(AuthConfig::EcsMetadata { endpoint })
    }

    /// AK/SK, named in problems by `first`, the field of it written first.
    fn ak_sk(&mut self, auth: &RawAuth, first: &str) -> Option<AuthConfig> {
        let (Some(ak), Some(sk)) = (&auth.access_key_file, &auth.secret_key_file) else {
            let missing = if auth.access_key_file.is_none() {
                "access_key_file"
            } else {
                "secret_key_file"
            };
            self.problem(
                auth_at(first),
                Target::Key,
                format!(
                    "AK/SK auth needs both `access_key_file:` and `secret_key_file:` \
                     (`security_token_file:` is optional); add `{missing}:`"
                ),
            );
            return None;
        };
        let access_key_file = self.resolve(ak, auth_at("access_key_file"), "access_key_file");
        let secret_key_file = self.resolve(sk, auth_at("secret_key_file"), "secret_key_file");
        let security_token_file = match &auth.security_token_file {
            None => None,
            Some(t) => {
                Some(self.resolve(t, auth_at("security_token_file"), "security_token_file")?)
            }
        };
        Some(AuthConfig::AkSk {
            access_key_file: access_key_file?,
            secret_key_file: secret_key_file?,
            security_token_file,
        })
    }

    /// An endpoint URL under `rule`; a problem at `at` if it breaks it.
    fn url(&mut self, text: &str, rule: HttpRule, at: Vec<Seg>) -> Option<String> {
        match check_url(text, rule) {
            Ok(url) => Some(url),
            Err(why) => {
                self.problem(at, Target::Value, why);
                None
            }
        }
    }
}

fn auth_at(field: &str) -> Vec<Seg> {
    path(&["kps", "auth", field])
}
