//! How times and byte counts are shown to people, the same in `xferd`'s admin commands, its
//! error messages and `xfer`'s listings.

use std::time::{Duration, UNIX_EPOCH};

/// Seconds since the epoch as RFC 3339 in UTC, to the second (`2026-12-03T18:34:17Z`). A time
/// before 1970 (only a damaged record has one) shows as the epoch rather than failing.
pub fn format_time(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A byte count in binary units with at most one decimal, which is dropped when it is zero:
/// `512 B`, `1.5 KiB`, `9.8 GiB`, `10 GiB`. Rounded to the nearest tenth, so a value just
/// under a limit can show as the limit: print exact counts where the difference matters.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut scaled = bytes as f64;
    // Move up while the value would show as 1024 or more of this unit once rounded.
    while unit + 1 < UNITS.len() && scaled >= 1023.95 {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let tenths = (scaled * 10.0).round() as u64;
    if tenths % 10 == 0 {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_seconds_in_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_796_322_857), "2026-12-03T18:34:17Z");
        assert_eq!(format_time(-5), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn byte_counts_use_binary_units_and_one_decimal() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(10 << 30), "10 GiB");
        assert_eq!(format_bytes((98 << 30) / 10), "9.8 GiB");
        assert_eq!(format_bytes((12 << 30) / 10), "1.2 GiB");
        // Just under 1 MiB rounds up to the next unit, never to "1024.0 KiB".
        assert_eq!(format_bytes((1 << 20) - 1), "1 MiB");
        assert_eq!(format_bytes(u64::MAX), "16 EiB");
    }
}
