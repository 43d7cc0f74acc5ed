//! Calendar arithmetic for the US-style date strings that App Service's legacy MSI endpoint puts
//! in `expires_on` (`"11/05/2021 15:18:31 +00:00"` on Linux, `"1/16/2020 5:24:12 AM +00:00"` on
//! Windows). The shapes are read here; the calendar arithmetic is the `time` crate's.

use time::{Date, Month, OffsetDateTime, Time};

/// Formats Unix seconds the way App Service on Linux does: `M/D/YYYY HH:MM:SS +00:00`.
/// Instants outside the `time` crate's range (±9999 years) are clamped to it.
pub fn format_us_date(epoch_seconds: i64) -> String {
    let instant =
        OffsetDateTime::from_unix_timestamp(epoch_seconds).unwrap_or(if epoch_seconds < 0 {
            OffsetDateTime::new_utc(Date::MIN, Time::MIDNIGHT)
        } else {
            OffsetDateTime::new_utc(Date::MAX, Time::MIDNIGHT)
        });
    format!(
        "{}/{}/{} {:02}:{:02}:{:02} +00:00",
        u8::from(instant.month()),
        instant.day(),
        instant.year(),
        instant.hour(),
        instant.minute(),
        instant.second()
    )
}

/// Parses `M/D/YYYY H:MM:SS [AM|PM] ±HH:MM` into Unix seconds; `None` if it is not that shape.
pub fn parse_us_date(text: &str) -> Option<i64> {
    let mut words = text.split_whitespace();
    let date = words.next()?;
    let time = words.next()?;
    let mut next = words.next()?;
    let meridiem = match next.to_ascii_uppercase().as_str() {
        "AM" => Some(false),
        "PM" => Some(true),
        _ => None,
    };
    if meridiem.is_some() {
        next = words.next()?;
    }
    let offset = next;
    if words.next().is_some() {
        return None;
    }

    let mut date_parts = date.split('/');
    let month: u8 = date_parts.next()?.parse().ok()?;
    let day: u8 = date_parts.next()?.parse().ok()?;
    let year: i32 = date_parts.next()?.parse().ok()?;
    if date_parts.next().is_some() {
        return None;
    }
    // Rejects month 13, February 30 and the like.
    let date = Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()?;

    let mut time_parts = time.split(':');
    let mut hour: i64 = time_parts.next()?.parse().ok()?;
    let minute: i64 = time_parts.next()?.parse().ok()?;
    let second: i64 = time_parts.next()?.parse().ok()?;
    if time_parts.next().is_some() || minute > 59 || second > 60 {
        return None;
    }
    match meridiem {
        Some(pm) if (1..=12).contains(&hour) => hour = hour % 12 + if pm { 12 } else { 0 },
        Some(_) => return None,
        None if hour > 23 => return None,
        None => {}
    }

    let (sign, offset) = match offset.as_bytes().first()? {
        b'+' => (1, &offset[1..]),
        b'-' => (-1, &offset[1..]),
        _ => return None,
    };
    let (offset_hours, offset_minutes) = offset.split_once(':')?;
    let offset_seconds = sign
        * (offset_hours.parse::<i64>().ok()? * 3600 + offset_minutes.parse::<i64>().ok()? * 60);

    let midnight = date.midnight().assume_utc().unix_timestamp();
    let local = midnight + hour * 3600 + minute * 60 + second;
    Some(local - offset_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_and_windows_app_service_dates_parse_to_the_same_instant() {
        // 2020-01-16T05:24:12Z
        assert_eq!(
            parse_us_date("1/16/2020 5:24:12 AM +00:00"),
            Some(1_579_152_252)
        );
        assert_eq!(
            parse_us_date("01/16/2020 05:24:12 +00:00"),
            Some(1_579_152_252)
        );
        assert_eq!(
            parse_us_date("1/16/2020 5:24:12 PM +00:00"),
            Some(1_579_152_252 + 43_200)
        );
        assert_eq!(
            parse_us_date("1/16/2020 12:00:00 AM +00:00"),
            Some(1_579_132_800)
        );
        assert_eq!(
            parse_us_date("1/16/2020 06:24:12 +01:00"),
            Some(1_579_152_252)
        );
    }

    #[test]
    fn formatting_round_trips_through_parsing() {
        for epoch in [0, 1_579_152_252, 1_951_488_000, 4_102_444_799] {
            assert_eq!(
                parse_us_date(&format_us_date(epoch)),
                Some(epoch),
                "{epoch}"
            );
        }
        assert_eq!(format_us_date(1_579_152_252), "1/16/2020 05:24:12 +00:00");
    }

    #[test]
    fn other_shapes_are_rejected() {
        for text in [
            "",
            "1579152252",
            "2020-01-16T05:24:12Z",
            "13/1/2020 1:00:00 +00:00",
            "1/1/2020 13:00:00 PM +00:00",
            "2/30/2020 1:00:00 +00:00",
        ] {
            assert_eq!(parse_us_date(text), None, "{text}");
        }
    }
}
