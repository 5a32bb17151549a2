//! The regions where KPS exists, as the official SDK knows them (`huaweicloudsdkkps` 3.1.219,
//! `v3/region/kps_region.py`: 30 regions, each served at `https://kms.{region}.myhuaweicloud.com`).
//! Only the region ids are taken from it. A region outside this table has no public KPS
//! endpoint: a private cloud names its own with `kps.endpoint`.

/// Region ids in the SDK's order.
pub(super) const KPS_REGIONS: [&str; 30] = [
    "cn-north-4",
    "cn-north-1",
    "cn-north-2",
    "cn-north-9",
    "cn-east-2",
    "cn-east-3",
    "cn-south-1",
    "cn-southwest-2",
    "ap-southeast-1",
    "ap-southeast-3",
    "ap-southeast-4",
    "la-south-2",
    "sa-brazil-1",
    "la-north-2",
    "ap-southeast-2",
    "na-mexico-1",
    "af-south-1",
    "cn-south-4",
    "cn-south-2",
    "me-east-1",
    "tr-west-1",
    "my-kualalumpur-1",
    "ru-moscow-1",
    "cn-east-5",
    "cn-east-4",
    "ap-southeast-5",
    "cn-north-12",
    "cn-north-11",
    "af-north-1",
    "cn-southwest-3",
];

pub(super) fn is_known(region: &str) -> bool {
    KPS_REGIONS.contains(&region)
}

/// The known region closest to `region` in edit distance (ties: the SDK's order).
pub(super) fn closest(region: &str) -> &'static str {
    KPS_REGIONS
        .iter()
        .min_by_key(|known| strsim::damerau_levenshtein(region, known))
        .copied()
        .expect("the table is not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_distinct_regions_and_near_misses_find_their_region() {
        let mut sorted = KPS_REGIONS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 30);
        for (typo, meant) in [
            ("cn-north4", "cn-north-4"),
            ("cn-nrth-4", "cn-north-4"),
            ("ap-southeast-7", "ap-southeast-1"),
            ("cn-east-6", "cn-east-2"),
            ("af-south1", "af-south-1"),
            ("tr-west-2", "tr-west-1"),
        ] {
            assert!(!is_known(typo));
            assert_eq!(closest(typo), meant, "{typo}");
        }
        assert!(is_known("my-kualalumpur-1"));
    }
}
