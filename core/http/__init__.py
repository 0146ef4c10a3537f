"""Outbound HTTP shared by webhook delivery and the RunComfy client: host lookups with a time
limit (`names`), interim answers read past (`interim`), exchanges that end by their deadline
(`deadlines`) and the egress policy that decides where a request may go (`egress`)."""
