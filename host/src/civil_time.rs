//! Calendar arithmetic for the US-style date strings that App Service's legacy MSI endpoint puts
//! in `expires_on` (`"11/05/2021 15:18:31 +00:00"` on Linux, `"1/16/2020 5:24:12 AM +00:00"` on
//! Windows). Small enough that a date-time crate is not worth its compile time.

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: `(year, month, day)`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    // Both casts are in range: day is 1..=31 and month 1..=12 by construction.
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats Unix seconds the way App Service on Linux does: `M/D/YYYY HH:MM:SS +00:00`.
pub(crate) fn format_us_date(epoch_seconds: i64) -> String {
    let (year, month, day) = civil_from_days(epoch_seconds.div_euclid(86_400));
    let seconds_of_day = epoch_seconds.rem_euclid(86_400);
    format!(
        "{month}/{day}/{year} {:02}:{:02}:{:02} +00:00",
        seconds_of_day / 3600,
        seconds_of_day % 3600 / 60,
        seconds_of_day % 60
    )
}

/// Parses `M/D/YYYY H:MM:SS [AM|PM] ±HH:MM` into Unix seconds; `None` if it is not that shape.
pub(crate) fn parse_us_date(text: &str) -> Option<i64> {
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
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    let year: i64 = date_parts.next()?.parse().ok()?;
    if date_parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }

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

    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
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
        ] {
            assert_eq!(parse_us_date(text), None, "{text}");
        }
    }
}
