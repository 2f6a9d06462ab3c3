//! The UTC calendar date and time, without a time-zone library.

/// A UTC time broken into calendar fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl Utc {
    /// Now.
    pub fn now() -> Utc {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Utc::from_unix(secs)
    }

    /// From seconds since 1970-01-01 (Howard Hinnant's civil-from-days).
    pub fn from_unix(secs: u64) -> Utc {
        let (days, rem) = ((secs / 86400) as i64, secs % 86400);
        let z = days + 719468;
        let era = z.div_euclid(146097);
        let doe = z - era * 146097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Utc { year, month, day, hour: (rem / 3600) as u32, minute: (rem % 3600 / 60) as u32, second: (rem % 60) as u32 }
    }

    /// `YYYYMMDDTHHMMSSZ`.
    pub fn stamp(&self) -> String {
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Utc;

    #[test]
    fn known_dates() {
        assert_eq!(Utc::from_unix(0).stamp(), "19700101T000000Z");
        assert_eq!(Utc::from_unix(951_782_400).stamp(), "20000229T000000Z");
        assert_eq!(Utc::from_unix(1_795_300_000).stamp(), "20261121T222640Z");
    }
}
